"""Parameter-efficient fine-tuning (tlkit.adapters): LoRA through peft, BitFit, norm-only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_trainer

from tlkit import ImageDataModule, TransferClassifier
from tlkit.adapters import adapter_state_dict, load_adapter, lora_targets
from tlkit.export import export, load_checkpoint
from tlkit.module import read_checkpoint


def _model(backbone: str = "test_resnet", **adapter) -> TransferClassifier:
    torch.manual_seed(0)
    return TransferClassifier(backbone, num_classes=10, lr=0.1, adapter=adapter or None)


def _trainable(model: TransferClassifier) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _dm() -> ImageDataModule:
    return ImageDataModule(source="digits", image_size=32, batch_size=8, preprocess="dataset", augment="none")


@pytest.mark.parametrize("backbone", ["test_vit", "test_resnet"])
def test_lora_trains_only_its_low_rank_matrices_and_the_head(backbone):
    model = _model(backbone, kind="lora", r=4)
    backbone_trainable = {n for n in _trainable(model) if n.startswith("backbone.")}
    assert backbone_trainable and all(".lora_A." in n or ".lora_B." in n for n in backbone_trainable)
    assert {n for n, _ in model.head.named_parameters()} <= {n.removeprefix("head.") for n in _trainable(model)}
    # a transformer gets LoRA on its linear layers (the fused qkv among them), a CNN on its ungrouped convolutions
    targets = lora_targets(_model(backbone).backbone.model)
    if backbone == "test_vit":
        assert any(t.endswith("attn.qkv") for t in targets) and not any("patch_embed" in t for t in targets)
    else:
        assert all(isinstance(_model(backbone).backbone.model.get_submodule(t), torch.nn.Conv2d) for t in targets)
    # every parameter keeps a stage, so freeze specs and layer decay still see the whole backbone
    staged = {n for names in model.backbone.stage_params().values() for n in names}
    assert staged == {n for n, _ in model.backbone.named_parameters()}


def test_bitfit_and_norm_train_biases_or_normalisation_layers():
    bitfit = {n for n in _trainable(_model(kind="bitfit")) if n.startswith("backbone.")}
    assert bitfit and all(n.endswith(".bias") for n in bitfit)
    norm = _model("test_vit", kind="norm")
    layers = {n.rpartition(".")[0] for n in _trainable(norm) if n.startswith("backbone.")}
    assert layers and all(isinstance(norm.get_submodule(layer), torch.nn.LayerNorm) for layer in layers)


def test_a_freeze_spec_still_applies_to_the_adapter_in_every_phase():
    free = _model("test_vit", kind="lora", r=4)
    staged = TransferClassifier("test_vit", num_classes=10, freeze="stages:2", adapter={"kind": "lora", "r": 4})
    stem_and_two = {f"backbone.{n}" for stage in list(staged.backbone.stage_params())[:3]  # the stem and 2 stages
                 for n in staged.backbone.stage_params()[stage]}  # fmt: skip
    assert _trainable(staged) == _trainable(free) - stem_and_two != _trainable(free)
    phased = TransferClassifier("test_vit", num_classes=10, adapter={"kind": "lora", "r": 4},
                                phases=[{"epochs": 1, "freeze": "backbone"}, {"freeze": "none"}])  # fmt: skip
    assert all(n.startswith("head.") for n in _trainable(phased))
    phased.enter_phase(phased._declared_phases()[1], index=1)
    assert _trainable(phased) == _trainable(free)  # "none" unfreezes the adapter, never the base weights


def test_bad_adapter_specs_get_one_clear_error():
    with pytest.raises(ValueError, match="adapter kind 'loraa' is not one of lora, bitfit, norm"):
        _model(kind="loraa")
    with pytest.raises(ValueError, match=r"takes \['alpha', 'dropout', 'r', 'targets'\], not \['rank'\]"):
        _model(kind="lora", rank=4)
    with pytest.raises(ValueError, match="'bitfit' takes no options"):
        _model(kind="bitfit", r=4)
    with pytest.raises(ValueError, match=r"LoRA targets \['nope'\] match no layer of test_vit"):
        _model("test_vit", kind="lora", targets=["nope"])
    with pytest.raises(ValueError, match="r >= 1"):
        _model(kind="lora", r=0)


def test_lora_fit_changes_only_the_adapter_writes_a_small_file_and_exports_merged(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _model("test_resnet", kind="lora", r=4)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = tiny_trainer(tmp_path, max_epochs=1, enable_checkpointing=True)
    trainer.fit(model, _dm())
    after = dict(model.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base)  # the pretrained weights never move
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in after.items() if ".lora_B." in n)  # B starts at 0

    small = trainer.checkpoint_callback.dirpath + "/adapter.safetensors"
    tensors = adapter_state_dict(model)
    assert sum(t.numel() for t in tensors.values()) < 0.2 * sum(p.numel() for p in model.parameters())
    fresh = load_adapter(_model("test_resnet", kind="lora", r=4), small).eval()
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(fresh(images), model.eval()(images))  # pretrained weights + small file = the model

    ckpt = next(iter(tmp_path.rglob("*.ckpt")))
    assert any(".lora_A." in k for k in read_checkpoint(ckpt)["state_dict"])  # the full checkpoint resumes the run
    reloaded, preprocess, _ = load_checkpoint(ckpt)
    out = export(ckpt, format="onnx", out=tmp_path / "model.onnx")
    onnx = pytest.importorskip("onnx")
    assert not any("lora" in tensor.name for tensor in onnx.load(str(out)).graph.initializer)  # merged
    session = onnxruntime.InferenceSession(str(out))
    shape = [2 if not isinstance(d, int) else d for d in session.get_inputs()[0].shape]
    uint8 = torch.randint(0, 256, shape, dtype=torch.uint8)
    with torch.no_grad():
        expected = reloaded(preprocess(uint8.float() / 255)).numpy()
    (got,) = session.run(None, {session.get_inputs()[0].name: uint8.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_lora_reaches_torchvision_attention_whose_projections_bypass_their_forward():
    """nn.MultiheadAttention uses its fused in_proj and its out_proj weights directly: LoRA on out_proj as a Linear
    would never run. `auto` adapts the attention layer (peft's LoRA for it covers both) and merges it back."""
    from peft import LoraConfig, inject_adapter_in_model
    from torchvision.models import VisionTransformer

    from tlkit.adapters import merge_adapter

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    targets = lora_targets(vit)
    assert [t for t in targets if t.endswith("self_attention")] and not [t for t in targets if "out_proj" in t]
    assert not [t for t in targets if "conv_proj" in t]  # the patch embedding stays as it was
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=targets), vit)
    for name, p in vit.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # (B starts at zero: the update would be 0 and prove nothing)
    images = torch.rand(2, 3, 32, 32)
    vit(images).sum().backward()
    lora = {n: p for n, p in vit.named_parameters() if ".lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    with torch.no_grad():
        before = vit(images)
        merge_adapter(vit)
        torch.testing.assert_close(vit(images), before, rtol=1e-4, atol=1e-5)
    assert not any(".lora_" in n for n, _ in vit.named_parameters())
