"""Train one epoch from shards on 2 processes (DDP over gloo) and save what each rank's batches held.

Run as a script (``python tests/_ddp_shards.py SHARDS OUT``): Lightning's DDP launcher starts rank 1 by re-running it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from tlkit import ImageDataModule, TransferClassifier


def fingerprints(images: torch.Tensor) -> list[float]:
    """One number per (normalised) image, the same on any process: which images a rank saw."""
    return [round(v, 2) for v in images.double().sum(dim=(1, 2, 3)).tolist()]


class Record(L.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.extend(fingerprints(batch[0]))


def data(shards: str) -> ImageDataModule:
    return ImageDataModule(source=f"litdata:{shards}", image_size=32, batch_size=2, augment="none")


def main(shards: str, out: Path) -> None:
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record], default_root_dir=out,
    )  # fmt: skip
    model = TransferClassifier(backbone="test_efficientnet", pretrained=False, num_classes=2, lr=0.01)
    trainer.fit(model, data(shards))
    torch.save(record.seen, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
