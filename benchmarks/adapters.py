"""Parameter-efficient fine-tuning against full fine-tuning and a linear probe, same data, same epochs.

On ``textures`` with the packaged ImageNet weights (tf_efficientnet_lite0, the quickstart recipe's settings): for
full fine-tuning, LoRA, BitFit, norm-only and the linear probe, prints trainable parameters, the size of what must be
saved besides the pretrained weights (the full checkpoint's weights, or ``adapter.safetensors``), the median
training-step time and the final val accuracy. Then, for a ViT without pretrained weights (parameter counts and
step time only; its accuracy from random weights would say nothing), the same columns but accuracy.

    python benchmarks/adapters.py [--epochs 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from tlkit import ImageDataModule, LinearProbe, TransferClassifier
from tlkit.adapters import save_adapter

RECIPE = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text())
# LRs: the quickstart's 0.02 for all layers; LoRA at 0.05 diverged (val 0.10), at 0.01 and 0.002 both gave 0.900
# (seed 0); BitFit and norm train 1-2 % of the weights and take a larger one.
CONFIGS: dict[str, dict[str, Any]] = {
    "full fine-tuning": {"freeze": "none"},
    "LoRA (r 8, alpha 16)": {"freeze": "none", "adapter": {"kind": "lora", "r": 8, "alpha": 16}, "lr": 0.01},
    "BitFit": {"freeze": "none", "adapter": {"kind": "bitfit"}, "lr": 0.05},
    "norm layers": {"freeze": "none", "adapter": {"kind": "norm"}, "lr": 0.05},
}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.start)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def total(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_mb(model: TransferClassifier, folder: Path) -> float:
    """MB that must be kept besides the pretrained weights: the adapter file, or all the weights."""
    if model.adapter:
        return save_adapter(model, folder / "adapter.safetensors").stat().st_size / 1e6
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


def row(name: str, model: torch.nn.Module, saved: float, step_times: list[float], acc: float | None) -> dict:
    return {"name": name, "trainable": trainable(model), "total": total(model), "saved_mb": saved,
            "step_ms": 1000 * statistics.median(step_times), "val_acc": acc}  # fmt: skip


def fine_tune(name: str, overrides: dict[str, Any], epochs: int, seed: int, folder: Path) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    args = {**RECIPE["model"]["init_args"], **overrides}
    data_args = RECIPE["data"]["init_args"]
    probe = ImageDataModule(**data_args)
    model = TransferClassifier(**args, num_classes=probe.num_classes, class_names=probe.class_names)
    timer = StepTimer()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], deterministic=True)  # fmt: skip
    trainer.fit(model, ImageDataModule(**data_args, data_config=model.data_config))
    return row(name, model, saved_mb(model, folder), timer.times, trainer.callback_metrics["val/acc"].item())


def linear_probe(epochs: int, seed: int) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    probe_recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "linear_probe.yaml").read_text())
    data_args = probe_recipe["data"]["init_args"]
    dm = ImageDataModule(**data_args)
    model = LinearProbe(**probe_recipe["model"]["init_args"], num_classes=dm.num_classes)
    timer = StepTimer()
    trainer = L.Trainer(max_epochs=probe_recipe["trainer"]["max_epochs"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])  # fmt: skip
    trainer.fit(model, model.feature_data(ImageDataModule(**data_args, data_config=model.data_config)))
    head = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 1e6  # the head
    return row("linear probe (converged, L-BFGS)", model, head, timer.times, trainer.callback_metrics["val/acc"].item())


def vit_rows(folder: Path, steps: int = 5) -> list[dict[str, Any]]:
    rows = []
    for name, overrides in CONFIGS.items():
        torch.manual_seed(0)
        kwargs = {k: v for k, v in overrides.items() if k in ("freeze", "adapter")}
        model = TransferClassifier("vit_small_patch16_224", num_classes=10, **kwargs)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        images, labels = torch.rand(32, 3, 224, 224), torch.randint(0, 10, (32,))
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - start)
        rows.append(row(f"vit_small_patch16_224: {name}", model, saved_mb(model, folder), times[1:], None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-vit", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [fine_tune(name, o, args.epochs, args.seed, Path(tmp)) for name, o in CONFIGS.items()]
        rows.append(linear_probe(args.epochs, args.seed))
        if not args.no_vit:
            rows += vit_rows(Path(tmp))
    print("| configuration | trainable parameters | saved besides the pretrained weights (MB) | step (ms) | val acc |")
    print("|---|---|---|---|---|")
    for r in rows:
        acc = "" if r["val_acc"] is None else f"{r['val_acc']:.3f}"
        share = f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f} %)"
        print(f"| {r['name']} | {share} | {r['saved_mb']:.2f} | {r['step_ms']:.0f} | {acc} |")


if __name__ == "__main__":
    main()
