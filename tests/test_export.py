"""Tests for tlkit.export: Conv+BN folding on timm and torchvision models, ONNX/TorchScript/safetensors exports."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import threadpoolctl
import timm
import torch
import torchvision
from conftest import tiny_trainer, write_image_folder
from timm.layers import BatchNormAct2d, CondConv2d, MixedConv2d, StdConv2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import tlkit.export as export_module
from tlkit import ImageDataModule, TransferClassifier
from tlkit.cli import main
from tlkit.data.preprocess import Normalize, Whitening
from tlkit.export import InferenceModel, export, fold_batchnorm, fuse, load_checkpoint, load_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial statistics, so that a wrong fold shows (fresh BatchNorms are the identity)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


@pytest.mark.parametrize(
    ("make", "expected"),
    [(lambda: timm.create_model("test_efficientnet"), 13), (lambda: torchvision.models.resnet18(), 20)],
    ids=["timm-BatchNormAct2d", "torchvision-resnet18"],
)
def test_fold_removes_every_batchnorm_and_keeps_outputs(make, expected):
    model = _randomise_bn(make())
    folded, count = fold_batchnorm(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        diff = (model(x) - folded(x)).abs().max().item()
    assert count == expected and diff < 1e-4
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    assert any(isinstance(m, _BatchNorm) for m in model.modules())  # the original is untouched


def test_batchnormact_keeps_its_activation_after_folding():
    model = _randomise_bn(timm.create_model("test_efficientnet"))
    folded, _ = fold_batchnorm(model)
    assert isinstance(folded.bn1, nn.Sequential) and isinstance(folded.bn1[1], type(model.bn1.act))


class _Branchy(nn.Module):
    """Data-dependent control flow (untraceable by torch.fx), and a conv whose output is used twice."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.shared, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(self.conv(x))
        if x.sum() > 0:
            x = x + 1
        return self.bn2(self.shared(x))


def test_fold_falls_back_to_module_order_when_tracing_fails():
    model = _randomise_bn(_Branchy())
    folded, count = fold_batchnorm(model)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=0)
    assert count == 2


def test_fold_skips_a_conv_whose_output_is_also_used_elsewhere():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _randomise_bn(Skip())
    folded, count = fold_batchnorm(model)
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))
    assert count == 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A briefly trained timm model (BatchNormAct2d inside) with dataset-fitted normalisation, at 16 px."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    L.seed_everything(0)
    model = TransferClassifier("test_efficientnet", num_classes=10, class_names=[f"d{i}" for i in range(10)])
    dm = ImageDataModule("digits", image_size=16, batch_size=16, preprocess="dataset")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, default_root_dir=root,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, dm)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _reference(checkpoint: str, images: torch.Tensor) -> torch.Tensor:
    model, preprocess, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        return model(preprocess(images.float() / 255))


def test_onnx_export_with_folding_matches_pytorch_in_onnxruntime(checkpoint, tmp_path, capsys):
    out = export(checkpoint, format="onnx", out=tmp_path / "m.onnx", fuse_bn=True)
    assert "Folded 13 BatchNorm layers" in capsys.readouterr().out
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    session = ort.InferenceSession(str(out))
    (logits,) = session.run(None, {"images": images.numpy()})
    np.testing.assert_allclose(logits, _reference(checkpoint, images).numpy(), atol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["class_names"]) == [f"d{i}" for i in range(10)]
    assert json.loads(props["tlkit.export"])["input"] == "uint8"


def test_torchscript_float_input_with_features(checkpoint, tmp_path):
    out = export(checkpoint, format="torchscript", out=tmp_path / "m.pt", input="float", return_features=True)
    extra = {"tlkit.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    logits, features = scripted(images.float() / 255)
    torch.testing.assert_close(logits, _reference(checkpoint, images), atol=1e-5, rtol=0)
    assert features.shape == (2, 256) and json.loads(extra["tlkit.json"])["outputs"] == ["logits", "features"]


def test_safetensors_export_reloads_into_a_transfer_classifier_without_pickle(checkpoint, tmp_path, monkeypatch):
    out = export(checkpoint, format="safetensors", out=tmp_path / "m.safetensors")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) used to reload"))
    model, preprocess = load_safetensors(out)
    assert isinstance(model, TransferClassifier) and model.class_names == [f"d{i}" for i in range(10)]
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(preprocess(images.float() / 255))
    monkeypatch.undo()
    torch.testing.assert_close(logits, _reference(checkpoint, images), atol=0, rtol=0)


def test_a_fold_that_changes_outputs_is_refused(checkpoint, tmp_path, monkeypatch):
    original = export_module._fold

    def broken(conv, scale, shift):
        leftover = original(conv, scale, shift)
        conv.bias.data += 1.0
        return leftover

    monkeypatch.setattr(export_module, "_fold", broken)
    with pytest.raises(RuntimeError, match="Folding BatchNorm changed the logits"):
        export(checkpoint, format="torchscript", out=tmp_path / "m.pt", fuse_bn=True)
    assert not (tmp_path / "m.pt").exists()


def test_cli_export_accepts_fuse_bn_flag(checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    main(["export", "--ckpt_path", checkpoint, "--format", "onnx", "--fuse-bn", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.is_file() and "max abs diff of the logits" in printed
    with pytest.raises(ValueError, match="Unknown format='tflite'"):
        export(checkpoint, format="tflite")


def test_extract_features_from_a_checkpoint_uses_its_preprocessing(checkpoint):
    from tlkit.features import extract_features

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    feats = extract_features(checkpoint, images)
    model, preprocess, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        expected = model.backbone(preprocess(images.float() / 255))
    torch.testing.assert_close(feats.features, expected, atol=1e-5, rtol=0)
    assert feats.metadata["weights"] == f"checkpoint:{checkpoint}"


# ------------------------------------------------------------------------------------------- whitened checkpoints


@pytest.fixture(scope="module", params=[("zca", "image"), ("pca", "channel")], ids=["zca-image", "pca-channel"])
def whitened_checkpoint(request, tmp_path_factory) -> str:
    """A test_resnet briefly trained behind a whitening fitted on its train split, at 16 px. Colour images (the class
    sets the dominant channel), so that channel-scope whitening has a full-rank colour covariance to fit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    kind, scope = request.param
    root = tmp_path_factory.mktemp(f"{kind}-{scope}")
    L.seed_everything(0)
    folder = write_image_folder(root / "images", size=20)
    model = TransferClassifier("test_resnet", num_classes=3, class_names=["cat", "dog", "owl"])
    dm = ImageDataModule(f"folder:{folder}", image_size=16, batch_size=8, preprocess=kind, whiten_scope=scope,
                         augment="none")  # fmt: skip
    trainer = tiny_trainer(root, limit_train_batches=2, limit_val_batches=1)
    # One BLAS thread for SciPy's eigh of the 768 x 768 image covariance: two OpenBLAS threads on a busy 2-core
    # machine make it take 6 s instead of 0.1 s (one_thread only limits torch).
    with threadpoolctl.threadpool_limits(1):
        trainer.fit(model, dm)
    path = root / "model.ckpt"
    trainer.save_checkpoint(path)
    torch.set_num_threads(threads)
    return str(path)


def _reloaded(checkpoint: str) -> tuple[TransferClassifier, ImageDataModule]:
    """The model and data module reloaded by Lightning: the data module restores its own fitted whitening."""
    model = TransferClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    return model, ImageDataModule.load_from_checkpoint(checkpoint, weights_only=True)


def _images(batch: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _run_exported(path, format: str, images: torch.Tensor) -> torch.Tensor:
    if format == "onnx":
        (logits,) = ort.InferenceSession(str(path)).run(None, {"images": images.numpy()})
        return torch.from_numpy(logits)
    with torch.no_grad():
        if format == "safetensors":
            model, preprocess = load_safetensors(path)
            return model(preprocess(images.float() / 255))
        return torch.jit.load(str(path))(images)


@pytest.mark.parametrize(
    ("format", "fuse_bn"),
    [("onnx", False), ("onnx", True), ("torchscript", False), ("torchscript", True), ("safetensors", False)],
    ids=["onnx", "onnx-fuse-bn", "torchscript", "torchscript-fuse-bn", "safetensors"],
)
def test_whitened_checkpoint_export_matches_the_data_module_pipeline(whitened_checkpoint, format, fuse_bn, tmp_path):
    args = ["export", "--ckpt_path", whitened_checkpoint, "--format", format, "--out", str(tmp_path / "m")]
    main(args + ["--fuse-bn"] * fuse_bn)
    images = _images(3)  # batch 3: the graph was traced at batch 2
    model, dm = _reloaded(whitened_checkpoint)
    with torch.no_grad():
        expected = model(dm.normalize(images))
    torch.testing.assert_close(_run_exported(tmp_path / "m", format, images), expected, atol=1e-4, rtol=0)


def test_whitened_export_uses_the_checkpoint_whitening_not_a_normalisation(whitened_checkpoint, tmp_path):
    out = export(whitened_checkpoint, format="torchscript", out=tmp_path / "m.pt")
    extra = {"tlkit.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    model, dm = _reloaded(whitened_checkpoint)
    kind, scope = dm.hparams.preprocess, dm.hparams.whiten_scope
    preprocess = load_checkpoint(whitened_checkpoint)[1]
    assert isinstance(preprocess, Whitening) and (preprocess.kind, preprocess.scope) == (kind, scope)
    assert json.loads(extra["tlkit.json"])["preprocess"]["kind"] == kind
    # The traced graph keeps the preprocessing's buffers: the fitted matrix and mean, not identity defaults.
    state = torch.load(whitened_checkpoint, map_location="cpu", weights_only=True)["ImageDataModule"]["preprocess"]
    assert torch.equal(scripted.preprocess.matrix, state["matrix"])
    assert torch.equal(scripted.preprocess.mean, state["mean"])
    assert not torch.equal(state["matrix"], torch.eye(len(state["matrix"])))
    # A Normalize in its place (the backbone's mean/std, what export falls back to without data module state) must
    # change the logits by far more than the 1e-4 export tolerance, or the comparisons above could not tell them apart.
    images = _images(3)
    normalize = Normalize(model.data_config["mean"], model.data_config["std"])
    with torch.no_grad():
        whitened, normalised = model(dm.normalize(images)), model(normalize(images))
        torch.testing.assert_close(scripted(images), whitened, atol=1e-4, rtol=0)
    assert (whitened - normalised).abs().max() > 1e-2


class _Mixed(nn.Module):
    """MixNet's pattern: timm's MixedConv2d splits the channels over convolutions of several kernel sizes and
    concatenates their outputs, then one BatchNorm(Act) normalises the concat."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.mixed = MixedConv2d(12, 12, kernel_size=[3, 5, 7], depthwise=True)
        self.bn1 = BatchNormAct2d(12)
        self.expand = MixedConv2d(12, 10, kernel_size=[1, 1], padding="")  # channel splits 5 + 5
        self.bn2 = nn.BatchNorm2d(10)

    def forward(self, x):
        return self.bn2(self.expand(self.bn1(self.mixed(self.bn0(self.stem(x))))))


class _CondConv(nn.Module):
    """EfficientNet-CondConv's pattern: experts mixed per sample by sigmoid routing weights, then a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv, self.route = CondConv2d(3, 6, 3, padding=1, num_experts=4, bias=True), nn.Linear(3, 4)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x, torch.sigmoid(self.route(x.mean((2, 3))))))


class _SharedConcat(nn.Module):
    """DenseNet's pattern: a concat whose parts also feed other layers; its BatchNorm cannot be folded."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        a = self.a(x)
        return self.bn(torch.cat([a, self.b(x)], 1)), a


@pytest.mark.parametrize(("make", "expected"), [(_Mixed, 3), (_CondConv, 1), (_SharedConcat, 0)])
def test_fold_follows_concats_of_convolutions_and_condconv(make, expected):
    torch.manual_seed(0)
    model = _randomise_bn(make())
    folded, count = fold_batchnorm(model)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert count == expected
    left = [name for name, m in folded.named_modules() if isinstance(m, _BatchNorm)]
    assert left == ([] if expected else ["bn"])


def test_fold_keeps_out_of_a_weight_standardising_conv():
    model = _randomise_bn(nn.Sequential(StdConv2d(3, 4, 3), nn.BatchNorm2d(4)))
    folded, count = fold_batchnorm(model)
    assert count == 0 and isinstance(folded[1], nn.BatchNorm2d)  # its forward would normalise the folded scale away


def _large_logits_net() -> InferenceModel:
    torch.manual_seed(0)
    backbone = _randomise_bn(timm.create_model("test_efficientnet", num_classes=0))
    head = nn.Linear(backbone.num_features, 5)
    head.weight.data *= 1e4  # logits ~1e4: float32 rounding of a correct fold exceeds any fixed 1e-4 bound
    return InferenceModel(nn.Identity(), backbone, head, input="float").eval()


def test_fuse_accepts_a_correct_fold_with_large_logits_and_refuses_a_wrong_one(monkeypatch, capsys):
    net, example = _large_logits_net(), torch.rand(4, 3, 32, 32)
    fused = fuse(net, example)
    with torch.no_grad():
        before, after = net(example), fused(example)
    diff, bound = export_module.fold_error(before, after)
    assert before.abs().max() > 1e3 and 1e-4 < diff <= bound  # the old absolute 1e-4 would have refused it
    assert "Folded 13 BatchNorm layers" in capsys.readouterr().out
    original = export_module._fold

    def off_by_a_little(conv, scale, shift):  # a wrong fold far smaller than the logits: 1% of one BN's shift
        return original(conv, scale, shift * 1.01)

    monkeypatch.setattr(export_module, "_fold", off_by_a_little)
    with pytest.raises(RuntimeError, match=r"changed the logits by .* max \|logit\|"):
        fuse(net, example)


@pytest.mark.parametrize(
    ("in_size", "out_size"), [((1, 1), 7), ((5, 3), (7, 2)), ((6, 4), (4, None)), ((13, 13), 6), ((8, 8), 4)]
)
def test_fixed_adaptive_pool_equals_torchs_adaptive_pool(in_size, out_size):
    net = nn.Sequential(nn.Identity(), nn.AdaptiveAvgPool2d(out_size))
    x = torch.randn(2, 3, *in_size)
    fixed = export_module.exportable_pools(net, x)
    divides = all(i % o == 0 for i, o in zip(in_size, net(x).shape[-2:], strict=True))
    assert (fixed is net) == divides  # only the pools the exporter refuses are replaced, in a copy
    assert isinstance(fixed[1], nn.AdaptiveAvgPool2d if divides else export_module.FixedAdaptiveAvgPool2d)
    assert isinstance(net[1], nn.AdaptiveAvgPool2d)
    torch.testing.assert_close(fixed(x), net(x), rtol=0, atol=1e-6)


def test_onnx_export_of_a_vgg_style_pool_on_a_small_image(tmp_path):
    """VGG pools its last map to 7x7; at 32 px that map is 1x1 and torch's exporter refuses the pool by itself."""
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=8, padding=1), nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(196, 3)
    )
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(Exception, match="not factor of input size"):
        torch.onnx.export(net, (x,), str(tmp_path / "plain.onnx"), dynamo=False)
    out = tmp_path / "m.onnx"
    export_module._write_onnx(net, x, out, {"outputs": ["logits"], "class_names": ["a", "b", "c"]}, 17)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, net(x).detach().numpy(), atol=1e-5)


def test_a_data_module_subclass_exports_with_its_fitted_statistics(checkpoint, tmp_path, caplog):
    """Lightning saves a data module's state under its class name: a subclass's fitted statistics must be found."""
    raw = torch.load(checkpoint, weights_only=True)
    raw["MyDataModule"] = raw.pop("ImageDataModule")  # what Lightning writes for `class MyDataModule(ImageDataModule)`
    renamed = tmp_path / "subclass.ckpt"
    torch.save(raw, renamed)
    _, expected, _ = load_checkpoint(checkpoint)
    _, got, _ = load_checkpoint(renamed)
    assert "No data module state" not in caplog.text
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(got.state_dict()[key], value)
    pretrained_mean = torch.tensor(TransferClassifier("test_efficientnet").data_config["mean"])
    assert not torch.allclose(got.state_dict()["mean"], pretrained_mean)  # the fitted statistics, not the weights'


def test_a_model_the_onnx_exporter_cannot_export_gets_one_clear_error_and_no_file(tmp_path):
    class Col2im(nn.Module):  # no opset-17 symbolic in torch's exporter
        def forward(self, x):
            return nn.functional.fold(x.flatten(2), output_size=x.shape[-2:], kernel_size=1)

    out = tmp_path / "m.onnx"
    meta = {"outputs": ["logits"], "class_names": ["a"], "hparams": {"backbone": "volo_d1_224"}}
    with pytest.raises(RuntimeError, match=r"cannot export 'volo_d1_224'.*col2im.*--format torchscript\|safetensors"):
        export_module._write_onnx(Col2im(), torch.rand(2, 3, 4, 4), out, meta, 17)
    assert list(tmp_path.iterdir()) == []
