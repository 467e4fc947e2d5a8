"""Tests on a CUDA GPU: mixed-precision channels-last training, torch.compile, feature extraction, the linear probe
and export of a checkpoint written on the GPU, each compared with the same thing on the CPU.

They run only on a machine with a CUDA GPU; elsewhere the whole module is skipped:

    python -m pytest tests/test_gpu.py                          # on the GPU machine
    TLKIT_TEST_DEVICE=cpu python -m pytest tests/test_gpu.py    # the same checks on the CPU, to test the tests

Float32 comparisons run with TF32 off (``torch_defaults``), so the device and the CPU agree to ~1e-5 and a 1e-3
tolerance only lets rounding through.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from conftest import tiny_trainer, write_image_folder
from test_export import _reference, _run_exported
from torch import nn

from tlkit import ImageDataModule, LinearProbe, TransferClassifier, create_backbone
from tlkit.cli import main
from tlkit.features import extract_features

DEVICE = os.environ.get("TLKIT_TEST_DEVICE", "cuda")
DEVICE_TYPE = torch.device(DEVICE).type
ACCELERATOR = "gpu" if DEVICE_TYPE == "cuda" else DEVICE_TYPE

pytestmark = [
    pytest.mark.skipif(
        DEVICE_TYPE == "cuda" and not torch.cuda.is_available(),
        reason="needs a CUDA GPU; run with TLKIT_TEST_DEVICE=cpu to check the tests' logic on a CPU",
    ),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module", autouse=True)
def torch_defaults():
    """TF32 off, for float32 comparisons with the CPU; deterministic algorithms off, as torch starts: a
    ``Trainer(deterministic=True)`` in another module leaves them on for the session, and the CUDA backward of
    adaptive average pooling refuses to run under them. For the whole module (its module fixtures train too), then
    restored."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.allow_tf32, matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(False)
    yield
    cudnn.allow_tf32, matmul.allow_tf32 = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=8, size=40)


def _data(folder: str, **kwargs) -> ImageDataModule:
    return ImageDataModule(f"folder:{folder}", image_size=32, batch_size=8, **kwargs)


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


class _Watch(L.Callback):
    """Per training step: the loss, where the parameters and the batch are, whether 4-D weights are channels-last."""

    def __init__(self):
        self.losses, self.where, self.batch_ndims, self.channels_last = [], set(), set(), set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.where |= {p.device.type for p in pl_module.parameters()} | {batch[0].device.type}
        self.batch_ndims.add(batch[0].ndim)
        weights = [p for p in pl_module.parameters() if p.ndim == 4]
        self.channels_last.add(all(p.is_contiguous(memory_format=torch.channels_last) for p in weights))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder):
    """EfficientNet-Lite0 (ImageNet weights, BatchNorm) fine-tuned on the device in bf16-mixed, channels-last, behind
    dataset-fitted normalisation; the checkpoint is saved from the model on the device."""
    root = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread does for the tests (a module fixture is set up before it)
    L.seed_everything(0)
    model = TransferClassifier("tf_efficientnet_lite0", pretrained="packaged", num_classes=3, channels_last=True)
    dm = _data(folder, preprocess="dataset", data_config=model.data_config)
    watch, seen = _Watch(), {"normalize": [], "backbone": [], "head": []}
    normalize = dm.normalize

    def recording_normalize(images):
        out = normalize(images)
        seen["normalize"].append((images.clone(), out.clone()))
        return out

    dm.normalize = recording_normalize  # what on_after_batch_transfer calls
    hooks = [
        model.backbone.register_forward_pre_hook(lambda m, args: seen["backbone"].append(args[0])),
        model.head.register_forward_hook(lambda m, args, out: seen["head"].append(out.dtype)),
    ]
    trainer = tiny_trainer(root, accelerator=ACCELERATOR, precision="bf16-mixed", callbacks=[watch],
                           limit_train_batches=2, limit_val_batches=1)  # fmt: skip
    trainer.fit(model, dm)
    del dm.normalize
    for hook in hooks:
        hook.remove()
    model.to(DEVICE).eval()  # Lightning's teardown moved it to the CPU
    path = root / "device.ckpt"
    trainer.save_checkpoint(path)
    torch.set_num_threads(threads)
    return dict(model=model, dm=dm, watch=watch, seen=seen, path=str(path))


def test_bf16_channels_last_fit_normalises_on_the_device_and_reloads_on_cpu(trained):
    model, dm, watch, seen = trained["model"], trained["dm"], trained["watch"], trained["seen"]
    assert len(watch.losses) == 2 and all(torch.isfinite(torch.tensor(watch.losses)))
    assert watch.where == {DEVICE_TYPE} and watch.batch_ndims == {4} and watch.channels_last == {True}
    assert set(seen["head"]) == {torch.bfloat16}  # autocast was on
    assert seen["backbone"]
    for x in seen["backbone"]:  # the model's input is made channels-last too
        assert x.device.type == DEVICE_TYPE and x.is_contiguous(memory_format=torch.channels_last)
    # The loaders yield uint8; the fitted normalisation runs on the device after the transfer.
    mean, std = dm.preprocess.mean.cpu().view(1, 3, 1, 1), dm.preprocess.std.cpu().view(1, 3, 1, 1)
    assert seen["normalize"] and not torch.equal(mean, torch.zeros_like(mean))
    for images, out in seen["normalize"]:
        assert images.dtype == torch.uint8 and images.device.type == DEVICE_TYPE
        assert out.dtype == torch.float32 and out.device.type == DEVICE_TYPE
        torch.testing.assert_close(out.cpu(), (images.cpu().float() / 255 - mean) / std, atol=1e-5, rtol=1e-5)
    raw = torch.load(trained["path"], weights_only=True)  # no map_location: tensors come back where they were saved
    assert {t.device.type for t in raw["state_dict"].values()} == {DEVICE_TYPE}
    reloaded = TransferClassifier.load_from_checkpoint(trained["path"], map_location="cpu").eval()
    assert {p.device.type for p in reloaded.parameters()} == {"cpu"}
    x = dm.normalize(_images())
    with torch.no_grad():
        on_device, on_cpu = model(x.to(DEVICE)).cpu(), reloaded(x)
    assert on_device.dtype == torch.float32
    torch.testing.assert_close(on_cpu, on_device, rtol=1e-3, atol=1e-4)


def test_export_of_a_device_checkpoint_with_folded_batchnorm_matches_the_cpu_model(trained, tmp_path, capsys):
    onnx_path, st_path = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    main(["export", "--ckpt_path", trained["path"], "--format", "onnx", "--fuse-bn", "--out", str(onnx_path)])
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trained["model"].backbone.modules())
    assert f"Folded {batchnorms} BatchNorm layers" in capsys.readouterr().out  # all of them, behind convolutions
    main(["export", "--ckpt_path", trained["path"], "--format", "safetensors", "--out", str(st_path)])
    images = _images()  # batch 3: the ONNX graph was traced at batch 2
    reference = _reference(trained["path"], images)  # the checkpoint's model and fitted normalisation, on the CPU
    torch.testing.assert_close(_run_exported(onnx_path, "onnx", images), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_run_exported(st_path, "safetensors", images), reference, atol=0, rtol=0)
    with torch.no_grad():
        on_device = trained["model"](trained["dm"].normalize(images.to(DEVICE))).cpu()
    torch.testing.assert_close(reference, on_device, rtol=1e-3, atol=1e-4)


def test_compiled_fit_runs_and_checkpoints_with_the_eager_parameter_names(folder, tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    L.seed_everything(0)
    model = TransferClassifier("test_resnet", num_classes=3, compile=True)
    watch = _Watch()
    trainer = tiny_trainer(tmp_path, accelerator=ACCELERATOR, precision="bf16-mixed", callbacks=[watch],
                           limit_train_batches=2, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, _data(folder, data_config=model.data_config))
    assert len(watch.losses) == 2 and all(torch.isfinite(torch.tensor(watch.losses))) and watch.where == {DEVICE_TYPE}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the backbone really was compiled
    trainer.save_checkpoint(tmp_path / "compiled.ckpt")
    state = torch.load(tmp_path / "compiled.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    eager = TransferClassifier("test_resnet", num_classes=3)
    assert list(state) == list(eager.state_dict()) and not any("_orig_mod" in k for k in state)
    eager.load_state_dict(state)  # strict


def test_extract_features_on_the_device_equals_the_cpu(folder):
    backbone = create_backbone("tf_efficientnet_lite0", pretrained="packaged")
    devices = []
    _first_conv(backbone).register_forward_pre_hook(lambda m, args: devices.append(args[0].device.type))
    dm = _data(folder)
    on_device = extract_features(backbone, dm, device=DEVICE)
    assert set(devices) == {DEVICE_TYPE}
    devices.clear()
    on_cpu = extract_features(backbone, dm, device="cpu")
    assert set(devices) == {"cpu"}
    assert on_device.ids == on_cpu.ids and len(on_cpu) == 24
    assert on_device.labels.tolist() == on_cpu.labels.tolist() == [*dm.data.train.targets, *dm.data.val.targets]
    assert on_device.metadata["splits"] == on_cpu.metadata["splits"]
    assert on_device.features.dtype == torch.float32 and on_device.features.device.type == "cpu"
    torch.testing.assert_close(on_device.features, on_cpu.features, rtol=1e-3, atol=1e-3)


def _probe(folder, tmp_path, device: str) -> tuple[LinearProbe, _Watch, set[str], list[torch.Tensor]]:
    """The linear probe of test_features, features extracted and the head trained on ``device``."""
    L.seed_everything(0)
    data = _data(folder, augment="none", num_workers=1)
    probe = LinearProbe("test_resnet", num_classes=3, weight_decay=1 / len(data.data.train))
    initial = [p.detach().clone() for p in probe.head.parameters()]
    backbone_devices: set[str] = set()
    _first_conv(probe.backbone).register_forward_pre_hook(lambda m, args: backbone_devices.add(args[0].device.type))
    features = probe.feature_data(data, device=device)
    watch = _Watch()
    accelerator = {"cuda": "gpu"}.get(torch.device(device).type, torch.device(device).type)
    trainer = tiny_trainer(tmp_path, accelerator=accelerator, max_epochs=2, callbacks=[watch])
    trainer.fit(probe, features)
    return probe, watch, backbone_devices, initial


def test_linear_probe_on_the_device_equals_the_cpu(folder, tmp_path):
    on_device, watch, device_backbone, initial = _probe(folder, tmp_path / "device", DEVICE)
    on_cpu, cpu_watch, cpu_backbone, _ = _probe(folder, tmp_path / "cpu", "cpu")
    assert device_backbone == {DEVICE_TYPE} and cpu_backbone == {"cpu"}  # features extracted there
    assert watch.batch_ndims == cpu_watch.batch_ndims == {2}  # the head trained on features, not images
    assert watch.where == {DEVICE_TYPE} and cpu_watch.where == {"cpu"}
    assert len(watch.losses) == len(cpu_watch.losses) == 2  # one full-batch L-BFGS step per epoch
    for a, b in zip(on_device.head.parameters(), on_cpu.head.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert any((a - b).abs().max() > 1e-2 for a, b in zip(on_device.head.parameters(), initial, strict=True))
