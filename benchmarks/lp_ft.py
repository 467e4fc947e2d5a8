"""LP-FT on ``textures``: the converged linear probe's head, then fine-tune every weight. Does it end above the probe?

Trains ``recipes/linear_probe.yaml``'s probe (L-BFGS to convergence), copies its head into a ``TransferClassifier``
with the quickstart's settings (``freeze: none``, no warmup, no label smoothing, no head dropout), checks that the
model starts at the probe's accuracy, and fine-tunes it for ``--epochs`` at each ``--lrs`` for each seed. Prints the
start and the final val accuracy of each run.

``--bn-eval`` keeps every BatchNorm layer in eval mode (the pretrained running statistics; the affine parameters still
train): the probe's head was fitted on features computed with those statistics, and fine-tuning in train mode
replaces them with the statistics of augmented 64-px crops.

    python benchmarks/lp_ft.py [--lrs 0.002,0.005,0.01] [--seeds 2] [--epochs 5] [--bn-eval] [--crop-scale 0.35]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import yaml

from tlkit import ImageDataModule, LinearProbe, TransferClassifier

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
PROBE = yaml.safe_load((ROOT / "recipes" / "linear_probe.yaml").read_text())


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)  # fmt: skip


def probe_head() -> tuple[dict[str, torch.Tensor], float]:
    L.seed_everything(0, verbose=False)
    data_args = PROBE["data"]["init_args"]
    names = ImageDataModule(**data_args)
    probe = LinearProbe(**PROBE["model"]["init_args"], num_classes=names.num_classes)
    trainer = quiet_trainer(max_epochs=PROBE["trainer"]["max_epochs"])
    trainer.fit(probe, probe.feature_data(ImageDataModule(**data_args, data_config=probe.data_config)))
    return probe.head.state_dict(), trainer.callback_metrics["val/acc"].item()


class BatchNormEval(TransferClassifier):
    """Every BatchNorm in eval mode, also where its parameters train."""

    def train(self, mode: bool = True) -> BatchNormEval:
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def fine_tune(head: dict, lr: float, seed: int, epochs: int, bn_eval: bool, crop_scale: float) -> tuple[float, float]:
    L.seed_everything(seed, verbose=False)
    data_args = {**QUICKSTART["data"]["init_args"], "crop_scale": (crop_scale, 1.0)}
    names = ImageDataModule(**data_args)
    args = {**QUICKSTART["model"]["init_args"], "freeze": "none", "lr": lr, "warmup_epochs": 0,
            "label_smoothing": 0.0, "head": {"dropout": 0.0}}  # fmt: skip
    model = (BatchNormEval if bn_eval else TransferClassifier)(**args, num_classes=names.num_classes)
    model.head.load_state_dict(head)
    data = ImageDataModule(**data_args, data_config=model.data_config)
    trainer = quiet_trainer(max_epochs=epochs, deterministic=True)
    start = trainer.validate(model, data, verbose=False)[0]["val/acc"]
    trainer.fit(model, data)
    return start, trainer.callback_metrics["val/acc"].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", default="0.002,0.005,0.01")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--bn-eval", action="store_true")
    parser.add_argument("--crop-scale", type=float, default=0.08, help="the random crop's smallest area")
    args = parser.parse_args()
    head, probe_acc = probe_head()
    print(f"probe: val acc {probe_acc:.4f}", flush=True)
    for lr in (float(v) for v in args.lrs.split(",")):
        for seed in range(args.seeds):
            start, end = fine_tune(head, lr, seed, args.epochs, args.bn_eval, args.crop_scale)
            print(f"lr {lr} seed {seed}: start {start:.4f} -> after {args.epochs} epochs {end:.4f}", flush=True)


if __name__ == "__main__":
    main()
