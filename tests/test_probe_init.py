"""LP-FT: ``head: {init: probe}`` starts the head as the converged linear probe of the train features;
``freeze_bn: all`` keeps every BatchNorm's pretrained statistics while its weight and bias train."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from _ddp_probe_init import SaveStartHead
from _ddp_probe_init import run as run_probe_init
from conftest import tiny_trainer, write_image_folder
from torch.utils.data import DataLoader, TensorDataset

from tlkit import ImageDataModule, TransferClassifier
from tlkit.features import extract_features
from tlkit.probe_init import ProbeHeadInit, fit_linear_head

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).with_name("_ddp_probe_init.py")


def _blobs(n: int = 120, dim: int = 6, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centres = torch.randn(classes, dim, generator=g)
    return centres[labels] + 1.5 * torch.randn(n, dim, generator=g), labels


def test_the_head_is_logistic_regressions_optimum_single_and_multi_label():
    """Multinomial: LogisticRegression(C=1) on the same features (same probabilities); multi-label: one
    LogisticRegression(C=1) per class. Both overlap, so the weight decay matters."""
    from sklearn.linear_model import LogisticRegression

    features, labels = _blobs()
    state, acc = fit_linear_head(features, labels, 3)
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(features, labels)
    ours = torch.softmax(features @ state["weight"].T + state["bias"], dim=1)
    torch.testing.assert_close(ours, torch.from_numpy(reference.predict_proba(features)).float(), atol=1e-3, rtol=0)
    assert acc == pytest.approx(reference.score(features, labels))
    assert 0.5 < acc < 1.0  # overlapping classes: the optimum is not a separating hyperplane

    flags = torch.stack([labels == 0, features[:, 0] > 0, labels != 2], dim=1).to(torch.uint8)
    state, _ = fit_linear_head(features, flags, 3, multilabel=True)
    for c in range(3):
        one = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(features, flags[:, c])
        torch.testing.assert_close(state["weight"][c], torch.from_numpy(one.coef_[0]).float(), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(state["bias"][c], torch.tensor(one.intercept_[0]).float(), atol=2e-3, rtol=1e-3)


def test_class_weights_and_weight_decay_change_the_optimum():
    features, labels = _blobs(seed=1)
    plain, _ = fit_linear_head(features, labels, 3)
    weighted, _ = fit_linear_head(features, labels, 3, class_weight=torch.tensor([5.0, 1.0, 1.0]))
    strong, _ = fit_linear_head(features, labels, 3, weight_decay=1.0)
    assert weighted["bias"][0] > plain["bias"][0] + 0.1  # class 0 counts more: its logit rises
    assert strong["weight"].norm() < 0.5 * plain["weight"].norm()
    with pytest.raises(ValueError, match="no images"):
        fit_linear_head(torch.empty(0, 4), torch.empty(0, dtype=torch.long), 3)


def _outputs(head: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """What a head makes of the features (logits): the optimum is compared there, where L-BFGS's float32
    stopping point (about 1e-4 in single weights) does not matter."""
    weight, bias = head.get("fc.weight", head.get("weight")), head.get("fc.bias", head.get("bias"))
    return features @ weight.T + bias


def _model(**kwargs) -> TransferClassifier:
    return TransferClassifier("test_resnet", num_classes=3, head={"init": "probe"}, freeze_bn="all", **kwargs)


def test_a_fit_starts_from_the_probe_of_the_train_features_and_a_resumed_fit_from_its_checkpoint(tmp_path):
    folder = write_image_folder(tmp_path / "data", per_class=8, size=36)
    L.seed_everything(0)
    model = _model(lr=0.05)
    dm = ImageDataModule(f"folder:{folder}", image_size=32, batch_size=4, data_config=model.data_config)
    train = extract_features(model, dm, split="train", device="cpu")  # eval transform, the dm's normalisation
    expected, _ = fit_linear_head(train.features, train.labels, 3)
    start = SaveStartHead()
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[start], enable_checkpointing=True)
    trainer.fit(model, dm)
    torch.testing.assert_close(_outputs(start.head, train.features), _outputs(expected, train.features), atol=2e-3,
                               rtol=1e-3)  # fmt: skip
    trained = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert not torch.equal(trained["fc.weight"], start.head["fc.weight"])  # and then it fine-tuned

    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    resumed_start = SaveStartHead()
    resumed = _model(lr=0.05)
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[resumed_start]).fit(resumed, dm, ckpt_path=ckpt)
    assert torch.equal(resumed_start.head["fc.weight"], trained["fc.weight"])  # not fitted again


def test_a_large_train_split_is_probed_on_a_seeded_random_subset(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "data", per_class=10, size=36)
    dm = ImageDataModule(f"folder:{folder}", image_size=32, batch_size=4, val_split=0.2)
    whole = [int(t) for _, targets in dm.train_eval_loader() for t in targets]
    picked = [int(t) for _, targets in dm.train_eval_loader(max_images=12) for t in targets]
    assert len(whole) == 24 and len(picked) == 12
    assert len(set(picked)) == 3  # random, not the first 12 of a class-ordered split
    assert picked == [int(t) for _, targets in dm.train_eval_loader(max_images=12) for t in targets]  # seeded
    said: list[str] = []
    monkeypatch.setattr("tlkit.probe_init.rank_zero_info", said.append)
    monkeypatch.setattr("tlkit.module.ProbeHeadInit", functools.partial(ProbeHeadInit, max_images=12))
    model = _model()
    tiny_trainer(tmp_path).fit(model, ImageDataModule(f"folder:{folder}", image_size=32, batch_size=4,
                                                      data_config=model.data_config))  # fmt: skip
    assert said[0].startswith("Head initialised as the linear probe of 12 training images' features (a random")


def test_freeze_bn_all_keeps_the_running_statistics_while_batchnorm_weights_train(tmp_path):
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 3, (12,))),
                        batch_size=4)  # fmt: skip
    for freeze_bn, stats_move in (("all", False), (True, True)):
        model = TransferClassifier("test_resnet", num_classes=3, freeze_bn=freeze_bn, lr=0.1)
        bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
        mean, weight = bn.running_mean.clone(), bn.weight.detach().clone()
        tiny_trainer(tmp_path).fit(model, loader)
        assert not torch.equal(bn.weight.detach(), weight)  # trains either way
        assert torch.equal(bn.running_mean, mean) != stats_move, freeze_bn
    with pytest.raises(ValueError, match="freeze_bn must be true, false or 'all'"):
        TransferClassifier("test_resnet", freeze_bn="some")


def test_a_probe_head_needs_a_linear_head_and_image_data_and_says_so(tmp_path):
    with pytest.raises(ValueError, match="hidden layers \\[8\\]"):
        TransferClassifier("test_resnet", head={"init": "probe", "hidden": [8]})
    with pytest.raises(ValueError, match="Unknown head init 'lbfgs'; valid options: auto, kaiming, xavier, probe"):
        TransferClassifier("test_resnet", head={"init": "lbfgs"})
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))), batch_size=4)
    with pytest.raises(ValueError, match="ImageDataModule.*this fit has no data module"):
        tiny_trainer(tmp_path).fit(_model(), loader)


def test_a_multi_label_fit_starts_from_per_class_probes(tmp_path):
    from test_multilabel import write_labels_csv

    csv_path = write_labels_csv(tmp_path)
    L.seed_everything(0)
    model = TransferClassifier("test_resnet", num_classes=3, multilabel=True, head={"init": "probe"})
    dm = ImageDataModule(f"csv:{csv_path}", image_size=32, batch_size=4, data_config=model.data_config)
    train = extract_features(model, dm, split="train", device="cpu")
    assert train.labels.shape == (len(dm.data.train), 3)  # multi-hot rows (extraction took int(label) before)
    train.save(tmp_path / "feats.safetensors")
    assert torch.equal(type(train).load(tmp_path / "feats.safetensors").labels, train.labels)
    expected, _ = fit_linear_head(train.features, train.labels, 3, multilabel=True)
    start = SaveStartHead()
    tiny_trainer(tmp_path, callbacks=[start]).fit(model, dm)
    torch.testing.assert_close(_outputs(start.head, train.features), _outputs(expected, train.features), atol=2e-3,
                               rtol=1e-3)  # fmt: skip


def test_ddp_ranks_start_from_the_same_probe_as_one_process(tmp_path):
    folder = write_image_folder(tmp_path / "data", per_class=8, size=36)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(SCRIPT), folder, str(tmp_path), "2"], check=True, timeout=600, env=env)
    ranks = [torch.load(tmp_path / f"devices2_rank{r}.pt", weights_only=True) for r in (0, 1)]
    single = run_probe_init(folder, tmp_path, 1)
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # each rank extracts half of the train split; fitted on the gathered rows (in another order), the same optimum
    features = torch.randn(16, single["fc.weight"].shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_outputs(ranks[0], features), _outputs(single, features), atol=2e-3, rtol=1e-3)
    assert not torch.allclose(_outputs(single, features), torch.zeros(16, 3), atol=0.1)  # a fitted head, not zeros
