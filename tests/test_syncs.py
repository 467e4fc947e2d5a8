"""No host-device synchronisation in a training step: on a GPU, each one makes the CPU wait until the GPU has run
everything queued, so Lightning's and tlkit's per-step Python runs while the GPU idles.

A CPU run cannot see those stalls, so these tests watch for their causes instead: the calls that read a tensor back to
the host (``.item()``, ``bool()``, ``torch.unique``, ``torch.bincount``, ...) and Python numbers that Lightning turns
into tensors on the module's device. ``benchmarks/gpu_syncs.py`` finds the stalls themselves on a GPU.
"""

from __future__ import annotations

import csv
import traceback

import lightning as L
import pytest
import torch
from conftest import tiny_trainer
from lightning.pytorch.loggers import CSVLogger
from torchmetrics import Metric
from torchmetrics.classification import MulticlassF1Score

from tlkit import ImageDataModule, TransferClassifier
from tlkit.tracking import TrainingSpeed

# Tensor methods and torch functions that read a device tensor back to the host (or need its values there).
READS = {
    torch.Tensor: ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero"),
    torch: ("unique", "bincount", "nonzero"),
}


class HostReads(L.Callback):
    """Records the host reads (see ``READS``) and device tensors made from Python values (``torch.tensor(...,
    device=...)``, what ``self.log`` does with a float) from the second training batch until the end of the
    second-to-last: whole steps, Lightning's work between them included."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, batches: int):
        self.batches, self.armed, self.calls = batches, False, []
        for owner, names in READS.items():
            for name in names:
                monkeypatch.setattr(owner, name, self._watch(getattr(owner, name), name))
        tensor = torch.tensor
        monkeypatch.setattr(torch, "tensor", self._watch(tensor, "tensor", when=lambda *a, **k: "device" in k))

    def _watch(self, fn, name, when=lambda *a, **k: True):
        def watched(*args, **kwargs):
            if self.armed and when(*args, **kwargs):
                self.armed = False  # (formatting the stack below reads no tensors, but be sure)
                self.calls.append(f"{name}:\n" + "".join(traceback.format_stack(limit=8)[:-1]))
                self.armed = True
            return fn(*args, **kwargs)

        return watched

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.armed = self.armed or batch_idx == 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.armed = self.armed and batch_idx < self.batches - 2


@pytest.fixture
def digits() -> ImageDataModule:
    return ImageDataModule(source="digits", image_size=32, batch_size=16, preprocess="pretrained", augment="none")


def test_training_steps_read_nothing_back_from_the_device(tmp_path, digits, monkeypatch):
    """Whole training steps, with class weights, a logger (not writing in these steps) and TrainingSpeed."""
    model = TransferClassifier("resnet18", num_classes=10, class_weights="balanced", class_counts=digits.class_counts,
                               freeze="stages:2")  # fmt: skip
    reads = HostReads(monkeypatch, batches=5)
    trainer = tiny_trainer(
        tmp_path, limit_train_batches=5, limit_val_batches=0, log_every_n_steps=50, logger=CSVLogger(tmp_path),
        callbacks=[reads, TrainingSpeed()],
    )  # fmt: skip
    trainer.fit(model, digits)
    assert reads.calls == [], f"{len(reads.calls)} host reads in 3 training steps, the first:\n{reads.calls[0]}"


def test_the_detector_sees_what_it_looks_for(tmp_path, digits, monkeypatch):
    """The test above passes because the steps read nothing, not because the detector is blind: a float given to
    self.log and torchmetrics' own F1 (torch.bincount) are caught."""

    class Validating(TransferClassifier):
        def training_step(self, batch, batch_idx):
            self.log("lr_as_float", 0.1)  # Lightning: torch.tensor(0.1, device=self.device)
            MulticlassF1Score(10).to(self.device).update(self(batch[0]), batch[1])  # torch.bincount
            return super().training_step(batch, batch_idx)

    reads = HostReads(monkeypatch, batches=4)
    tiny_trainer(tmp_path, limit_train_batches=4, limit_val_batches=0, callbacks=[reads]).fit(
        Validating("resnet18", num_classes=10), digits
    )
    assert sum(call.startswith("tensor:") for call in reads.calls) == 2  # 2 steps
    assert sum(call.startswith("bincount:") for call in reads.calls) == 2


def test_learning_rates_and_throughput_are_logged_as_cpu_tensors_every_step(tmp_path, digits, monkeypatch):
    """Not as Python numbers (a copy to the device and a synchronisation in every step), and still in every row of
    metrics.csv with the optimizer's values."""
    logged, lrs = [], []
    log = TransferClassifier.log

    def recording_log(self, name, value, *args, **kwargs):
        logged.append((name, value))
        return log(self, name, value, *args, **kwargs)

    class Recorded(TransferClassifier):
        def on_train_batch_start(self, batch, batch_idx):
            lrs.append(next(g["lr"] for g in self._logged_groups() if g["name"] == "head"))  # this step's LR

    monkeypatch.setattr(TransferClassifier, "log", recording_log)
    model = Recorded("resnet18", num_classes=10, freeze="stages:3", lr=0.1, phases=[{"epochs": 1}, {"lr": 0.01}])
    trainer = tiny_trainer(
        tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0, log_every_n_steps=1,
        logger=CSVLogger(tmp_path), callbacks=[TrainingSpeed()],
    )  # fmt: skip
    trainer.fit(model, digits)

    assert [name for name, value in logged if not isinstance(value, torch.Tensor | Metric)] == []
    cpu = {name for name, value in logged if isinstance(value, torch.Tensor) and value.device.type == "cpu"}
    assert {"lr/head", "lr/layer4", "perf/img_per_s", "phase"} <= cpu
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss_step")]
    assert [float(row["lr/head"]) for row in rows] == pytest.approx(lrs, rel=1e-6)  # every step, as before
    assert all(float(row["perf/img_per_s"]) > 0 for row in rows)
    assert [row["phase"] for row in rows] == ["0.0"] * 3 + ["1.0"] * 3


@pytest.mark.parametrize("bar", [False, True])
def test_loss_goes_to_the_progress_bar_only_when_there_is_one(tmp_path, digits, bar):
    """Lightning converts progress-bar values to Python numbers after every step, a synchronisation: with
    ``enable_progress_bar=False`` (benchmarks, scripts, ``tlkit`` quiet runs) the loss is not a progress-bar value."""
    trainer = tiny_trainer(tmp_path, limit_train_batches=1, limit_val_batches=0, enable_progress_bar=bar)
    trainer.fit(TransferClassifier("resnet18", num_classes=10), digits)
    assert ("train/loss_step" in trainer.progress_bar_metrics) == bar
    assert "train/loss" in trainer.callback_metrics


def test_metrics_have_no_compute_groups():
    """Merging compute groups compares the metrics' states on the host after the first batch (and merged the wrong
    ones, see the next test)."""
    model = TransferClassifier("resnet18", num_classes=10)
    for collection in (model.train_metrics, model.val_metrics, model.test_metrics):
        assert len(collection) == 3 and not collection._enable_compute_groups


def test_a_perfect_first_batch_keeps_f1_and_top5_apart():
    """With compute groups, a first batch without a top-1 mistake gives F1 and top-5 accuracy equal states, and the
    collection merged them: F1 was computed from top-5 hits from then on."""
    model = TransferClassifier("resnet18", num_classes=10)
    targets = torch.arange(10).repeat(3)
    model.val_metrics.update(torch.nn.functional.one_hot(targets, 10).float(), targets)
    logits, targets = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)), torch.arange(200) % 10
    model.val_metrics.update(logits, targets)
    f1 = MulticlassF1Score(10, average="macro")
    f1.update(torch.nn.functional.one_hot(torch.arange(10).repeat(3), 10).float(), torch.arange(10).repeat(3))
    f1.update(logits, targets)
    assert model.val_metrics.compute()["val/f1"] == pytest.approx(f1.compute().item())


def test_macro_f1_matches_torchmetrics_without_bincount(monkeypatch):
    """The train/val/test F1 counts with a scatter-add: ``torch.bincount`` reads its input's min and max back from
    a GPU. Same values as MulticlassF1Score, absent classes and several batches included."""
    model = TransferClassifier("resnet18", num_classes=7)
    reference = MulticlassF1Score(7, average="macro")
    generator = torch.Generator().manual_seed(0)

    def no_bincount(*args, **kwargs):
        raise AssertionError("torch.bincount synchronises on CUDA")

    for n in (1, 5, 64):
        logits, targets = torch.randn(n, 7, generator=generator), torch.randint(0, 6, (n,), generator=generator)
        reference.update(logits, targets)
        reference.update(logits.argmax(1), targets)
        with monkeypatch.context() as m:
            m.setattr(torch, "bincount", no_bincount)
            model.train_metrics["f1"].update(logits, targets)
            model.train_metrics["f1"].update(logits.argmax(1), targets)  # labels work too
    assert model.train_metrics["f1"].compute() == pytest.approx(reference.compute().item())


def test_labels_out_of_range_fail_clearly():
    """torchmetrics does not check the labels' values when preds are logits; the cross-entropy, computed first, names
    a bad label (not the F1's scatter-add)."""
    model = TransferClassifier("resnet18", num_classes=3)
    model.log_dict = lambda *a, **k: None
    with pytest.raises(IndexError, match="Target 5 is out of bounds"):
        model._shared_step((torch.randn(2, 3, 32, 32), torch.tensor([0, 5])), model.train_metrics)
