"""A fit whose head starts as the linear probe (``head: {init: probe}``), on 1 process or 2 (DDP over gloo); saves
the head each rank starts training with.

Run as a script (``python tests/_ddp_probe_init.py FOLDER OUT 2``): Lightning's DDP launcher starts rank 1 by
re-running it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from tlkit import ImageDataModule, TransferClassifier


class SaveStartHead(L.Callback):
    def __init__(self) -> None:
        self.head: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.head = {k: v.detach().clone() for k, v in pl_module.head.state_dict().items()}


def run(folder: str, out: Path, devices: int) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    model = TransferClassifier("test_resnet", num_classes=3, head={"init": "probe"}, freeze_bn="all", lr=0.01)
    data = ImageDataModule(f"folder:{folder}", image_size=32, batch_size=4, data_config=model.data_config)
    saver = SaveStartHead()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
        limit_train_batches=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[saver], default_root_dir=out,
    )  # fmt: skip
    trainer.fit(model, data)
    torch.save(saver.head, out / f"devices{devices}_rank{trainer.global_rank}.pt")
    return saver.head


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
