"""LP-FT on ``textures``: the converged linear probe's head, then fine-tune every weight. Does it end above the probe?

Fine-tunes ``recipes/lp_ft.yaml`` (``head: {init: probe}``: the head starts as the converged linear probe of the
train features) for ``--epochs`` at each of ``--lrs``, for each seed, with BatchNorm as the recipe keeps it
(``freeze_bn: all``, the pretrained running statistics) or, with ``--bn-train``, in train mode (the statistics of
the augmented crops replace them). Prints the val accuracy the run starts from (the probe's, checked after the head
is fitted) and ends at.

    python benchmarks/lp_ft.py [--lrs 0.002,0.005,0.01] [--seeds 2] [--epochs 5] [--bn-train] [--crop-scale 0.35]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import yaml

from tlkit import ImageDataModule, TransferClassifier

ROOT = Path(__file__).resolve().parents[1]
RECIPE = yaml.safe_load((ROOT / "recipes" / "lp_ft.yaml").read_text())


class StartAccuracy(L.Callback):
    """Val accuracy once the head is the probe (ProbeHeadInit runs in on_fit_start, before this sanity check)."""

    def __init__(self) -> None:
        self.value: float | None = None

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.value = trainer.callback_metrics["val/acc"].item()


def fine_tune(lr: float, seed: int, epochs: int, bn_train: bool, crop_scale: float) -> tuple[float, float]:
    L.seed_everything(seed, verbose=False)
    data_args = {**RECIPE["data"]["init_args"], "crop_scale": (crop_scale, 1.0)}
    names = ImageDataModule(**data_args)
    args = {**RECIPE["model"]["init_args"], "lr": lr, "freeze_bn": True if bn_train else "all"}
    model = TransferClassifier(**args, num_classes=names.num_classes)
    data = ImageDataModule(**data_args, data_config=model.data_config)
    start = StartAccuracy()
    trainer = L.Trainer(max_epochs=epochs, deterministic=True, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[start],
                        num_sanity_val_steps=-1)  # fmt: skip
    trainer.fit(model, data)
    return start.value, trainer.callback_metrics["val/acc"].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", default="0.002,0.005,0.01")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--bn-train", action="store_true", help="BatchNorm in train mode (freeze_bn: true)")
    parser.add_argument("--crop-scale", type=float, default=0.08, help="the random crop's smallest area")
    args = parser.parse_args()
    for lr in (float(v) for v in args.lrs.split(",")):
        for seed in range(args.seeds):
            start, end = fine_tune(lr, seed, args.epochs, args.bn_train, args.crop_scale)
            print(f"lr {lr} seed {seed}: start {start:.4f} -> after {args.epochs} epochs {end:.4f}", flush=True)


if __name__ == "__main__":
    main()
