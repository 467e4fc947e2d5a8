"""A small phased fine-tuning run for the resume tests: shuffled, ``augment="basic"``, 2 loader workers, dropout.

Imported by ``tests/test_resume.py`` (``run``), or run as a script for a separate process, a SIGKILL or 2-process
DDP over gloo (Lightning's DDP launcher starts rank 1 by re-running the script)::

    python tests/_resume_run.py OUT TAG [--devices 2] [--resume CKPT] [--kill-at-step N]

It writes ``OUT/TAG_rank{r}.pt``: the final weights, the global step, the number of batches this run trained on and
this rank's share of the last epoch's order.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from tlkit import ImageDataModule, TransferClassifier

PHASES = [{"epochs": 1, "freeze": "stages:4", "lr": 0.05}, {"freeze": "none", "lr": 0.02, "layer_decay": 0.7}]
EPOCHS, BATCHES = 3, 5  # 15 optimizer steps, the phase change after step 5
MID_EPOCH_EVERY = 3  # mid-epoch checkpoints at steps 3, 6 (epoch 1), 9, 12


class CountBatches(L.Callback):
    def __init__(self) -> None:
        self.trained = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.trained += 1


class KillAtStep(L.Callback):
    """SIGKILL this process (no clean-up runs) after optimizer step ``step``, before its checkpoint is written
    (Lightning runs ModelCheckpoint after the other callbacks): ``last.ckpt`` holds step ``step - 1``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def make(sampler: str | None = None, adapter: dict | None = None) -> tuple[TransferClassifier, ImageDataModule]:
    # Each rank its own random stream (as Lightning's default seeding gives), so restoring the wrong rank's shows.
    L.seed_everything(int(os.environ.get("LOCAL_RANK", 0)))
    model = TransferClassifier(
        "test_efficientnet",
        num_classes=10,
        phases=PHASES,
        head={"dropout": 0.3},
        momentum=0.9,
        schedule="cosine",
        adapter=adapter,
    )
    dm = ImageDataModule("textures", image_size=32, batch_size=8, num_workers=2, augment="basic", sampler=sampler)
    return model, dm


def run(
    out: Path,
    tag: str,
    devices: int = 1,
    resume: Path | None = None,
    kill_at_step: int | None = None,
    sampler: str | None = None,
    adapter: dict | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run; returns (and saves) ``{"weights", "global_step", "trained"}``."""
    model, dm = make(sampler, adapter)
    counter = CountBatches()
    callbacks: list[L.Callback] = [counter]
    if resume is None:
        callbacks += [
            ModelCheckpoint(out, filename="{epoch}-{step}", save_top_k=-1, every_n_train_steps=MID_EPOCH_EVERY),
            ModelCheckpoint(out, filename="end-{epoch}", save_top_k=-1, save_on_train_epoch_end=True),
            ModelCheckpoint(out, filename="unused", save_top_k=0, save_last=True, every_n_train_steps=1),
        ]
    if kill_at_step is not None:
        callbacks.append(KillAtStep(kill_at_step))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto",
        max_epochs=EPOCHS,
        limit_train_batches=BATCHES,
        limit_val_batches=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(model, dm, ckpt_path=resume)
    result = {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "global_step": trainer.global_step,
        "trained": counter.trained,
        "last_epoch_order": list(trainer.train_dataloader.sampler),  # this rank's share of the last epoch
    }
    torch.save(result, out / f"{tag}_rank{trainer.global_rank}.pt")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("tag")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--kill-at-step", type=int)
    args = parser.parse_args()
    run(args.out, args.tag, args.devices, args.resume, args.kill_at_step)
