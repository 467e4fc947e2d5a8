"""Tests for tlkit.features: exactness against the libraries' own forward, order, files, streaming, the cache."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import write_image_folder
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.io import write_png
from torchvision.models.feature_extraction import create_feature_extractor

from tlkit import ImageDataModule, TransferClassifier, create_backbone
from tlkit.cli import main
from tlkit.features import FeatureSet, ShardWriter, extract_features, merge_shards
from tlkit.probe import FeatureDataModule, LinearProbe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """Two classes of 12 small PNGs whose colour tells the class (so a linear probe can learn them)."""
    root = tmp_path_factory.mktemp("imgs")
    gen = torch.Generator().manual_seed(0)
    for label, name in enumerate(["dark", "light"]):
        (root / name).mkdir()
        for i in range(12):
            base = 60 + 120 * label
            image = (base + torch.randint(-40, 40, (3, 16, 16), generator=gen)).clamp(0, 255).to(torch.uint8)
            write_png(image, str(root / name / f"{i:02d}.png"))
    return str(root)


# ------------------------------------------------------------------------------------------------ exactness


# Every kind of head pooling timm has, on its tiny test models or the smallest family member (random init).
POOL_KINDS = {
    "token": ("test_vit", {}, 160),
    "map": ("test_vit", {"global_pool": "map"}, 160),  # attention pooling
    "avg+fc_norm": ("test_vit", {"global_pool": "avg"}, 160),  # a norm after pooling, class token left out
    "avg+norm_head": ("test_convnext", {}, 32),  # NormMlpClassifierHead: pool, then LayerNorm
    "metaformer": ("poolformerv2_s12", {}, 32),  # MetaFormer: pool, then norm
    "max": ("test_resnet", {"global_pool": "max"}, 32),
    "avgmax": ("test_resnet", {"global_pool": "avgmax"}, 32),
    "catavgmax": ("test_resnet", {"global_pool": "catavgmax"}, 32),  # twice num_features wide
    "conv_after_pool": ("mobilenetv3_small_050", {}, 32),  # head_hidden_size: a 1x1 conv after the pooling
    "nhwc+mlp": ("test_mambaout", {}, 64),  # (N, H, W, C) maps, an MLP head
}


def _pre_logits(backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        model = backbone.model.eval()
        return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("kind", list(POOL_KINDS))
def test_default_features_are_the_models_pre_logits_and_what_the_classifier_sees(kind):
    name, overrides, size = POOL_KINDS[kind]
    backbone = create_backbone(name, **overrides).eval()
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    feats = extract_features(backbone, x, preprocess="none")
    assert feats.metadata["pool"] == "model" and feats.features.dtype == torch.float32
    assert feats.features.shape == (2, backbone.num_features)
    torch.testing.assert_close(feats.features, _pre_logits(backbone, x), atol=1e-5, rtol=0)
    with torch.no_grad():
        classifier_input = backbone(x)  # Backbone.forward: what TransferClassifier's head is trained on
    torch.testing.assert_close(feats.features, classifier_input, atol=0, rtol=0)


def test_explicit_pool_that_is_the_models_own_is_its_head_path(images):
    backbone = create_backbone("test_convnext").eval()  # avg pool, then the head's LayerNorm
    feats = extract_features(backbone, images, pool="avg", preprocess="none").features
    torch.testing.assert_close(feats, _pre_logits(backbone, images), atol=1e-5, rtol=0)


def test_explicit_avg_on_an_attention_pooled_vit_averages_its_patch_tokens():
    backbone = create_backbone("test_vit", global_pool="map").eval()
    x = torch.rand(2, 3, 160, 160)
    feats = extract_features(backbone, x, pool="avg", preprocess="none").features
    with torch.no_grad():
        tokens = backbone.model.forward_features(x)
    torch.testing.assert_close(feats, tokens[:, backbone.model.num_prefix_tokens :].mean(1), atol=1e-5, rtol=0)
    assert (feats - _pre_logits(backbone, x)).abs().max() > 1e-2  # not what the model's own head gives


def test_nhwc_maps_are_pooled_over_their_spatial_dimensions():
    backbone = create_backbone("swin_tiny_patch4_window7_224", img_size=32, window_size=1, depths=(1, 1, 1, 1))
    x = torch.rand(2, 3, 32, 32)
    feats = extract_features(backbone.eval(), x, pool="max", preprocess="none").features
    with torch.no_grad():
        maps = backbone.model.forward_features(x)  # (N, H, W, C)
    torch.testing.assert_close(feats, maps.amax(dim=(1, 2)), atol=1e-5, rtol=0)


IMPOSSIBLE_POOLS = {  # kind: (model, overrides, input size, pool asked for, what the error must say)
    "token_without_class_token": (
        ("test_vit", {"global_pool": "avg", "class_token": False}, 160, "token"),
        r"needs a class token.*'test_vit' has none.*pool='model'",
    ),
    "token_on_a_cnn": (
        ("test_resnet", {}, 32, "token"),
        r"pool='token' needs a transformer's token sequence.*'test_resnet'.*pool='model'",
    ),
    "conv_after_pool": (
        ("mobilenetv3_small_050", {}, 32, "max"),
        r"pool='max' on 'mobilenetv3_small_050' gives 288-wide.*1024-wide.*pool='model'",
    ),
    "torchvision_mlp_after_pool": (
        ("torchvision/mobilenet_v3_small", {}, 32, "max"),
        r"pool='max' on 'torchvision/mobilenet_v3_small' gives 576-wide.*1024-wide.*pool='model'",
    ),
    "catavgmax": (
        ("test_resnet", {"global_pool": "catavgmax"}, 32, "avg"),
        r"pool='avg' on 'test_resnet' gives 96-wide.*192-wide.*'catavgmax'",
    ),
    "uncounted_class_token": (
        ("pit_ti_224", {}, 224, "avg"),
        r"'pit_ti_224' has a class token but does not say how many prefix tokens.*pool='model'",
    ),
}


@pytest.mark.parametrize("kind", list(IMPOSSIBLE_POOLS))
def test_explicit_pools_the_model_cannot_give_name_the_model_and_the_fix(kind):
    (name, overrides, size, pool), message = IMPOSSIBLE_POOLS[kind]
    backbone = create_backbone(name, **overrides)
    with pytest.raises(ValueError, match=message):
        extract_features(backbone, torch.rand(1, 3, size, size), pool=pool, preprocess="none")


def test_layers_take_the_models_pool_type_or_ask_for_one(images):
    backbone = create_backbone("resnet18").eval()  # its own pool is avg, so the layers are averaged
    feats = extract_features(backbone, images, layers=["layer3"], preprocess="none").features
    with torch.no_grad():
        (layer3,) = backbone.model.forward_intermediates(images, indices=[3], intermediates_only=True)
    torch.testing.assert_close(feats, layer3.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    attention_pooled = create_backbone("test_vit", global_pool="map")
    with pytest.raises(ValueError, match=r"layers= with pool='model': 'test_vit' pools with 'map'.*pool='avg'"):
        extract_features(attention_pooled, torch.rand(1, 3, 160, 160), layers=["blocks.0"])


def test_vit_layers_by_index_give_each_layers_class_token():
    """A ViT's own pool is its class token; timm's intermediates come as maps with that token split off, so every
    ViT failed `layers=[...]` with the default pool, and the error suggested the pool already in use."""
    backbone = create_backbone("test_vit").eval()
    images = torch.rand(2, 3, 160, 160)
    caught = {}
    hooks = [backbone.model.blocks[i].register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out))
             for i in (0, -1)]  # fmt: skip
    with torch.no_grad():
        backbone.model.forward_features(images)
    for hook in hooks:
        hook.remove()
    feats = extract_features(backbone, images, layers=[0, -1], preprocess="none")
    torch.testing.assert_close(feats.layers["0"], caught[0][:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.layers["-1"], caught[-1][:, 0], atol=1e-5, rtol=0)
    maps_only = create_backbone("cait_xxs24_224")  # its intermediates cannot return the class token
    with pytest.raises(
        ValueError, match=r"pool='model' on layers takes each one's class token.*Use pool='avg', 'max' or 'none' for"
    ):
        extract_features(maps_only, torch.rand(1, 3, 224, 224), layers=[0], preprocess="none")


def test_torchvision_features_equal_the_models_avgpool_path(images):
    backbone = create_backbone("torchvision/resnet18").eval()
    feats = extract_features(backbone, images, preprocess="none")
    with torch.no_grad():
        expected = create_feature_extractor(backbone.model, {"flatten": "out"})(images)["out"]
    torch.testing.assert_close(feats.features, expected, atol=1e-5, rtol=0)
    spatial = extract_features(backbone, images, preprocess="none", pool="max").features
    with torch.no_grad():
        layer4 = create_feature_extractor(backbone.model, {"layer4": "out"})(images)["out"]
    torch.testing.assert_close(spatial, layer4.amax(dim=(2, 3)), atol=1e-5, rtol=0)


def test_layers_follow_timm_and_torchvision_and_name_the_valid_ones(images):
    backbone = create_backbone("resnet18").eval()
    by_name = extract_features(backbone, images, layers=["layer2", "layer3"], pool="none", preprocess="none")
    by_index = extract_features(backbone, images, layers=[2, 3], pool="none", preprocess="none")
    with torch.no_grad():
        expected = backbone.model.forward_intermediates(images, indices=[2, 3], intermediates_only=True)
    assert list(by_name.layers) == ["layer2", "layer3"]
    for got_name, got_index, want in zip(by_name.layers.values(), by_index.layers.values(), expected, strict=True):
        torch.testing.assert_close(got_name, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_index, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"Unknown layers \['layer9'\].*'layer1'"):
        extract_features(backbone, images, layers=["layer9"])
    with pytest.raises(ValueError, match=r"Unknown layers \['layer9'\].*layer4\.1\.relu_1"):
        extract_features("torchvision/resnet18", images, layers=["layer9"], pretrained=False)


# ----------------------------------------------------------------------------------- order, files, streaming


def test_loader_rows_keep_order_and_labels(images):
    labels = torch.tensor([3, 1, 4, 1, 5])
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    backbone = create_backbone("test_efficientnet")
    feats = extract_features(backbone, loader)
    alone = extract_features(backbone, images[3:4])
    assert feats.labels.tolist() == labels.tolist()
    assert feats.ids == ["0", "1", "2", "3", "4"]
    assert backbone.training  # extraction runs in eval mode and hands the module back as it was
    torch.testing.assert_close(feats.features[3:4], alone.features, atol=1e-5, rtol=0)


def test_folder_with_a_non_image_file_extracts_its_images(tmp_path):
    root = write_image_folder(tmp_path / "images")
    (Path(root) / "cat" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="not images"):
        feats = extract_features(create_backbone("test_efficientnet"), root, split="all")
    assert len(feats) > 0 and not any(path.endswith(".txt") for path in feats.ids)


def test_extracting_mid_training_keeps_frozen_batchnorm_in_eval(images):
    model = TransferClassifier("test_resnet", num_classes=2, freeze="backbone").train()
    extract_features(model, images[:2])
    batchnorms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert model.backbone.training and batchnorms and not any(bn.training for bn in batchnorms)


def test_featureset_save_load_is_safetensors_with_json_metadata(tmp_path, images):
    feats = extract_features(create_backbone("test_efficientnet"), images, layers=["blocks.0", "blocks.1"])
    path = feats.save(tmp_path / "f.safetensors")
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])  # the safetensors layout, no pickle inside
    meta = json.loads(header["__metadata__"]["tlkit.features"])
    assert meta["backbone"] == "test_efficientnet" and meta["layers"] == ["blocks.0", "blocks.1"]
    assert meta["preprocess"]["module"] == "Normalize"
    loaded = FeatureSet.load(path)
    assert list(loaded.layers) == ["blocks.0", "blocks.1"] and loaded.ids == feats.ids
    for name in feats.layers:
        assert torch.equal(loaded.layers[name], feats.layers[name])
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]  # written through a temporary file
    with pytest.raises(ValueError, match="several layers"):
        _ = loaded.features


def test_out_streams_shards_with_bounded_memory_and_one_ordered_file(tmp_path, images, monkeypatch):
    peaks = []
    original = ShardWriter.flush

    def flush(self, rank):
        peaks.append(self.buffered)
        original(self, rank)

    monkeypatch.setattr(ShardWriter, "flush", flush)
    backbone = create_backbone("test_efficientnet")
    data = torch.cat([images, images.flip(0)])
    in_memory = extract_features(backbone, data)
    streamed = extract_features(backbone, data, out=tmp_path / "f.safetensors", batch_size=2, shard_size=3)
    assert len(peaks) >= 3 and max(peaks) <= 3 + 1  # at most one batch over the shard size is ever held
    torch.testing.assert_close(streamed.features, in_memory.features, atol=1e-6, rtol=0)
    assert streamed.ids == [str(i) for i in range(10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]  # shards cleaned up


def _shard(path, rows: range, dim: int = 2):
    index = torch.tensor(list(rows))
    writer = ShardWriter(path.parent, shard_size=100, ids=[f"img{i}" for i in range(100)])
    writer.buffer = [
        {"features": {"features": index[:, None].float().expand(-1, dim)}, "labels": index, "index": index}
    ]
    writer.buffered = len(index)
    writer.flush(rank=int(path.name))
    return writer.shards[0]


def test_merge_orders_shards_of_several_ranks_and_rejects_gaps(tmp_path):
    """What `tlkit extract --devices N` does after the ranks wrote their contiguous blocks (no DDP run here)."""
    shards = [_shard(tmp_path / "1", range(4, 7)), _shard(tmp_path / "0", range(0, 4))]
    out = merge_shards(shards, tmp_path / "all.safetensors", {"backbone": "x", "layers": ["features"]})
    merged = FeatureSet.load(out)
    assert merged.features[:, 0].tolist() == list(range(7)) and merged.labels.tolist() == list(range(7))
    assert merged.ids == [f"img{i}" for i in range(7)]
    with pytest.raises(ValueError, match="starts at 4, expected 0"):
        merge_shards(shards[:1], tmp_path / "bad.safetensors", {})


# ------------------------------------------------------------------------------------- data module, folder, CLI


def test_data_module_rows_use_its_preprocessing_and_split_order(folder):
    backbone = create_backbone("test_efficientnet").eval()
    dm = ImageDataModule(f"folder:{folder}", image_size=16, preprocess="dataset", batch_size=8,
                         data_config=backbone.data_config)  # fmt: skip
    feats = extract_features(backbone, dm)
    n_train, n_val = len(dm.data.train), len(dm.data.val)
    assert feats.metadata["splits"] == {"train": [0, n_train], "val": [n_train, n_train + n_val]}
    assert feats.labels.tolist() == list(dm.data.train.targets) + list(dm.data.val.targets)
    assert feats.ids == list(dm.data.train.samples) + list(dm.data.val.samples)
    image, _ = dm.val_dataloader().dataset[2]  # evaluation transform; statistics fitted on train
    with torch.no_grad():
        expected = backbone(dm.normalize(image[None]))
    torch.testing.assert_close(feats.split("val").features[2:3], expected, atol=1e-5, rtol=0)
    assert feats.split("train").ids == list(dm.data.train.samples)


def test_cli_extract_writes_features_of_a_folder(tmp_path, folder):
    out = tmp_path / "feats.safetensors"
    args = ["extract", "--backbone", "test_efficientnet", "--pretrained", "false", "--data.source", f"folder:{folder}",
            "--data.image_size", "16", "--split", "val", "--out", str(out)]  # fmt: skip
    main(args)
    feats = FeatureSet.load(out)
    assert len(feats) == 4 and feats.features.shape[1] == create_backbone("test_efficientnet").num_features
    assert all(path.endswith(".png") for path in feats.ids) and sorted(set(feats.labels.tolist())) == [0, 1]
    assert feats.metadata["pool"] == "model"  # as the Python API: what a classifier on this backbone sees


# ---------------------------------------------------------------------------------------------- linear probe


def _lbfgs_probe(folder, epochs: int = 8, batch_size: int | None = None, callbacks=()):
    L.seed_everything(0)
    probe = LinearProbe("test_resnet", num_classes=3, weight_decay=0.0)
    images = ImageDataModule(f"folder:{folder}", image_size=16, augment="none", data_config=probe.data_config)
    data = probe.feature_data(images, batch_size=batch_size)
    probe = LinearProbe("test_resnet", num_classes=data.num_classes, weight_decay=1 / len(data.train_set))
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))  # fmt: skip
    trainer.fit(probe, data)
    return probe, data


def test_lbfgs_probe_reaches_logistic_regressions_optimum(tmp_path):
    """The standard linear-probe protocol, LogisticRegression(C=1) on the same features, minimises the mean
    cross-entropy + |W|^2 / (2N): the L-BFGS probe with weight_decay=1/N must land on the same weights."""
    from sklearn.linear_model import LogisticRegression

    folder = write_image_folder(tmp_path, per_class=8, size=16)  # 3 classes: sklearn fits the softmax model
    probe, data = _lbfgs_probe(folder)
    train, val = data.train_set, data.val_set  # what the head was trained on
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(train.features, train.labels)
    head = probe.head.fc
    torch.testing.assert_close(head.weight.detach(), torch.as_tensor(reference.coef_).float(), atol=2e-3, rtol=1e-2)
    probabilities = probe(val.features).softmax(1).detach()
    torch.testing.assert_close(probabilities, torch.as_tensor(reference.predict_proba(val.features)).float(),
                               atol=1e-3, rtol=0)  # fmt: skip


def test_probe_features_are_the_backbones_on_the_data_modules_preprocessing(folder):
    probe = LinearProbe("test_resnet", num_classes=2)
    images = ImageDataModule(f"folder:{folder}", image_size=16, augment="none", data_config=probe.data_config)
    data = probe.feature_data(images)
    images.setup()
    batch = next(iter(images.val_dataloader()))[0]
    with torch.no_grad():
        expected = probe.backbone.eval()(images.normalize(batch))
    torch.testing.assert_close(data.val_set.features[: len(batch)], expected, atol=1e-5, rtol=1e-4)
    assert data.class_names == images.class_names and data.class_counts == images.class_counts


def test_probe_features_are_what_an_attention_pooled_classifier_sees_not_an_average(folder):
    probe = LinearProbe("test_vit3", num_classes=2)  # its own pool is 'map' (attention pooling)
    images = ImageDataModule(f"folder:{folder}", batch_size=8, augment="none", data_config=probe.data_config)
    data = probe.feature_data(images)  # test_vit3's own 160-px input
    images.setup()
    batch = next(iter(images.val_dataloader()))[0]
    with torch.no_grad():
        expected = probe.backbone.eval()(images.normalize(batch))
    torch.testing.assert_close(data.val_set.features[: len(batch)], expected, atol=1e-5, rtol=1e-4)
    averaged = extract_features(probe.backbone, images, split="val", pool="avg").features
    assert (averaged[: len(batch)] - expected).abs().max() > 1e-2


def test_probe_refuses_augmented_data_and_says_when_it_cannot_take_full_batch_steps(folder):
    probe = LinearProbe("test_resnet", num_classes=2)
    augmented = ImageDataModule(f"folder:{folder}", image_size=16, augment="basic", data_config=probe.data_config)
    with pytest.raises(ValueError, match="augment='basic'.*TransferClassifier"):
        probe.feature_data(augmented)
    with pytest.warns(UserWarning, match="full-batch L-BFGS steps, but an epoch has 3 batches"):
        _lbfgs_probe(folder, epochs=1, batch_size=8)
    with pytest.raises(ValueError, match="a backbone name or num_features"):
        LinearProbe()


def test_lbfgs_probe_counts_metrics_once_per_step(folder):
    """L-BFGS evaluates the batch at every line-search point; the train metrics describe each step once."""
    counts = []

    class Counted(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            counts.append(int(pl_module.train_metrics["acc"].tp.sum() + pl_module.train_metrics["acc"].fn.sum()))

    probe, data = _lbfgs_probe(folder, epochs=3, callbacks=[Counted()])
    assert counts == [len(data.train_set)] * 3
    assert probe.trainer.optimizers[0].state_dict()["state"][0]["func_evals"] > 3  # it did evaluate more often


def test_a_probe_trains_on_saved_features_without_a_backbone(tmp_path, folder):
    probe = LinearProbe("test_resnet", num_classes=2)
    images = ImageDataModule(f"folder:{folder}", image_size=16, augment="none", data_config=probe.data_config)
    probe.feature_data(images).features.save(tmp_path / "f.safetensors")
    data = FeatureDataModule(str(tmp_path / "f.safetensors"))
    head_only = LinearProbe(num_features=data.train_set.features.shape[1], num_classes=data.num_classes)
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(head_only, data)
    assert head_only.backbone is None and head_only.trainer.callback_metrics["val/acc"] >= 0


def test_cli_extract_on_two_ddp_ranks_writes_one_ordered_file(tmp_path, folder):
    """Two gloo CPU processes (Lightning's DDP launcher) each extract a block; rank 0 merges them in order."""
    out, weights = tmp_path / "ddp.safetensors", tmp_path / "weights.safetensors"
    backbone = create_backbone("test_efficientnet")
    save_file(backbone.model.state_dict(), weights)
    args = ["extract", "--backbone", "test_efficientnet", "--pretrained", str(weights),
            "--data.source", f"folder:{folder}", "--data.image_size", "16", "--device", "cpu", "--devices", "2",
            "--batch_size", "3", "--shard_size", "4", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-m", "tlkit.cli", *args], check=True, env=env, cwd=tmp_path, timeout=300)
    merged = FeatureSet.load(out)
    single = extract_features(backbone, ImageDataModule(f"folder:{folder}", image_size=16))
    assert merged.ids == single.ids and merged.labels.tolist() == single.labels.tolist()
    torch.testing.assert_close(merged.features, single.features, atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.safetensors", "weights.safetensors"]


def test_hiera_features_use_its_head_pool_and_norm_and_keep_every_token():
    # Hiera keeps its pool type in head.pool_type and normalises after pooling; it has no class token to drop.
    backbone = create_backbone("hiera_tiny_224")
    x = torch.rand(2, 3, 224, 224)
    feats = extract_features(backbone, x, preprocess="none").features
    explicit = extract_features(backbone, x, pool="avg", preprocess="none").features  # its own pool type
    expected = _pre_logits(backbone, x)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=0)


def test_token_sequences_without_prefix_tokens_average_every_token():
    from tlkit.features import FeatureExtractor

    backbone = create_backbone("hiera_tiny_224")
    tokens = torch.randn(2, 49, 768)
    pooled = FeatureExtractor(backbone, pool="avg")._pool(tokens)
    torch.testing.assert_close(pooled, tokens.mean(dim=1))


def test_extract_features_of_a_fixed_size_model_at_another_size_names_the_setting() -> None:
    from tlkit.backbones import create_backbone

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    for options in ({}, {"layers": [0], "pool": "avg"}):  # the backbone's own forward, and forward_intermediates
        with pytest.raises(ValueError, match=r"test_vit3 takes 160x160 images .* failed on 64x64"):
            extract_features(create_backbone("test_vit3"), images, preprocess="none", device="cpu", **options)
