"""EMA of the weights (Lightning's EMAWeightAveraging, switched on by TransferClassifier(ema_decay=...))."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import tiny_trainer, write_image_folder
from lightning.pytorch.callbacks import ModelCheckpoint

from tlkit import ImageDataModule, TransferClassifier
from tlkit.module import read_checkpoint


class RecordHead(L.Callback):
    """The head's raw weights after every optimiser step."""

    def __init__(self):
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(pl_module.head.fc.weight.detach().clone())


def _dm() -> ImageDataModule:
    return ImageDataModule(source="digits", image_size=32, batch_size=8, preprocess="dataset", augment="none")


def _model(**kwargs) -> TransferClassifier:
    torch.manual_seed(0)
    kwargs.setdefault("num_classes", 10)
    return TransferClassifier("test_resnet", freeze="backbone", lr=0.1, ema_decay=0.6, **kwargs)


def test_ema_weights_equal_the_closed_form_average_and_are_what_validation_and_checkpoints_use(tmp_path):
    recorder = RecordHead()
    model = _model()
    trainer = tiny_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=1, callbacks=[recorder])
    trainer.fit(model, _dm())
    raw = recorder.weights
    assert len(raw) == 6 and not torch.allclose(raw[0], raw[-1])
    expected = raw[0]  # AveragedModel starts from the first step's weights, then ema = d * ema + (1 - d) * w
    for weights in raw[1:]:
        expected = 0.6 * expected + 0.4 * weights
    torch.testing.assert_close(model.head.fc.weight, expected)  # fit ends with the average in the model
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    checkpoint = read_checkpoint(tmp_path / "ema.ckpt")
    torch.testing.assert_close(checkpoint["state_dict"]["head.fc.weight"], expected)


def test_a_checkpoint_keeps_the_raw_weights_for_resuming(tmp_path):
    recorder = RecordHead()
    trainer = tiny_trainer(
        tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[recorder],
        enable_checkpointing=True,
    )  # fmt: skip
    trainer.fit(_model(), _dm())
    checkpoint = read_checkpoint(next(tmp_path.rglob("*.ckpt")))  # written at the epoch's end, mid-fit
    torch.testing.assert_close(checkpoint["current_model_state"]["head.fc.weight"], recorder.weights[-1])
    assert not torch.allclose(checkpoint["state_dict"]["head.fc.weight"], recorder.weights[-1])


def test_a_resumed_ema_run_ends_with_the_same_average(tmp_path):
    folder = write_image_folder(tmp_path / "images", per_class=8, size=32)  # 18 train images: 3 steps per epoch

    def fit(max_epochs: int, ckpt_path=None) -> TransferClassifier:
        L.seed_everything(0)
        model = _model(num_classes=3)
        dm = ImageDataModule(
            source=f"folder:{folder}", image_size=32, batch_size=6, augment="basic", preprocess="dataset"
        )
        epoch_end = ModelCheckpoint(tmp_path / "ckpts", filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
        trainer = tiny_trainer(
            tmp_path, max_epochs=max_epochs, limit_train_batches=None, limit_val_batches=1, callbacks=[epoch_end],
            enable_checkpointing=True,
        )  # fmt: skip
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model

    whole = fit(3).state_dict()
    resumed = fit(3, ckpt_path=tmp_path / "ckpts" / "epoch=0.ckpt").state_dict()
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_an_ema_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match=f"ema_decay={decay}"):
        TransferClassifier("test_resnet", num_classes=3, ema_decay=decay)
