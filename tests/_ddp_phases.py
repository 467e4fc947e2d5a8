"""A phased fine-tuning run, on 1 process or 2 (DDP over gloo), that saves the parameters after every epoch.

Run as a script (``python tests/_ddp_phases.py OUT 2 [lora]``): Lightning's DDP launcher starts rank 1 by re-running
it. With ``lora`` the backbone trains through a LoRA adapter (its pretrained weights stay fixed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Sampler, TensorDataset

from tlkit import TransferClassifier

# No BatchNorm (GroupNorm), so a per-rank batch of 4 computes exactly what one process does on the global batch of 8.
MODEL = "test_efficientnet_gn"
PHASES = [
    {"epochs": 1, "freeze": "backbone", "lr": 0.05},
    {"epochs": 1, "freeze": "stages:3", "lr": 0.02, "layer_decay": 0.5},
    {"epochs": 1, "freeze": "none", "lr": 0.02, "layer_decay": 0.7},
]
GLOBAL_BATCH = 8


class Interleaved(Sampler[int]):
    """Rank r of w takes samples r, r + w, ... in order (Lightning's own DistributedSampler would shuffle them), so
    the ranks' batches of step k together are the single process's batch k."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _rank_world(self) -> tuple[int, int]:  # read late: the process group starts after the loader is built
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        return self.size // self._rank_world()[1]


class SaveParameters(L.Callback):
    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


ADAPTERS = {"lora": {"kind": "lora", "r": 4, "alpha": 8}}


def run(devices: int, out: Path, adapter: str | None = None) -> list[dict[str, torch.Tensor]]:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 3, (16,), generator=g))
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // devices, sampler=Interleaved(len(data)))
    model = TransferClassifier(MODEL, num_classes=3, phases=PHASES, head={"dropout": 0.0}, schedule="cosine",
                               adapter=ADAPTERS.get(adapter))  # fmt: skip
    saver = SaveParameters()
    strategy = DDPStrategy(process_group_backend="gloo") if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=len(PHASES),
        callbacks=[saver],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        use_distributed_sampler=False,
    )
    trainer.fit(model, loader)
    torch.save(saver.epochs, out / f"devices{devices}_rank{trainer.global_rank}.pt")
    return saver.epochs


if __name__ == "__main__":
    torch.set_num_threads(1)  # in the test process, the one_thread fixture does this (and undoes it)
    run(int(sys.argv[2]), Path(sys.argv[1]), *sys.argv[3:])
