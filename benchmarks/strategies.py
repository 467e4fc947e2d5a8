"""Fine-tuning strategies compared on the built-in ``textures`` data, same backbone and total epochs.

(a) linear probe (backbone frozen), (b) full fine-tune, (c) gradual unfreezing with layer-wise LR decay
(recipes/phased.yaml's phases). Prints, per strategy and phase, the train epoch time (min / median over the epochs of
that phase; validation excluded) with its ratio to the baseline, a full fine-tune epoch, and the final val accuracy.

    python benchmarks/strategies.py            # EfficientNet-Lite0 (packaged ImageNet weights), 5 epochs, CPU
    python benchmarks/strategies.py --seeds 0 1 --epochs 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning as L
import torch

from tlkit import ImageDataModule, TransferClassifier

PHASED = [
    {"epochs": 1, "freeze": "backbone", "lr": 0.02},
    {"epochs": 2, "freeze": "stages:5", "lr": 0.01, "warmup_epochs": 0.2},
    {"epochs": 2, "freeze": "none", "lr": 0.01, "layer_decay": 0.7},
]
STRATEGIES: dict[str, dict[str, Any]] = {
    "(a) linear probe": dict(freeze="backbone", lr=0.02),
    "(b) full fine-tune": dict(freeze="none", lr=0.01, warmup_epochs=1),
    "(c) gradual + layer decay": dict(phases=PHASED),
}
COMMON = dict(
    backbone="tf_efficientnet_lite0",
    pretrained="packaged",
    head={"dropout": 0.2},
    optimizer="sgd",
    momentum=0.9,
    weight_decay=1e-4,
    schedule="cosine",
    label_smoothing=0.1,
)


class EpochTimer(L.Callback):
    """Wall time of each training epoch, up to the start of its validation."""

    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []  # (phase, seconds)
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: TransferClassifier) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: TransferClassifier) -> None:
        if self._start is not None and not trainer.sanity_checking:
            self.times.append((pl_module.phase_index, time.perf_counter() - self._start))
            self._start = None


def run(name: str, epochs: int, seed: int) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    kwargs = {**COMMON, **STRATEGIES[name]}
    if "phases" in kwargs:
        kwargs["phases"] = [dict(p) for p in kwargs["phases"]]
        kwargs["phases"][-1]["epochs"] = epochs - sum(p["epochs"] for p in kwargs["phases"][:-1])
    data = ImageDataModule(source="textures", image_size=64, batch_size=32, num_workers=2, augment="basic")
    model = TransferClassifier(num_classes=data.num_classes, **kwargs)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, data)
    trainable = [
        sum(p.numel() for n, p in model.named_parameters() if n not in _frozen(model, i))
        for i in range(len(model.phases))
    ]
    return {"acc": trainer.callback_metrics["val/acc"].item(), "times": timer.times, "trainable": trainable}


def _frozen(model: TransferClassifier, phase: int) -> set[str]:
    model.enter_phase(phase)
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.set_float32_matmul_precision("highest")
    results = {name: [run(name, args.epochs, seed) for seed in args.seeds] for name in STRATEGIES}
    full_epochs = [t for r in results["(b) full fine-tune"] for _, t in r["times"][1:]]  # epoch 0 starts workers
    baseline = statistics.median(full_epochs)
    print(
        f"\nbaseline: full fine-tune train epoch, median {baseline:.2f} s "
        f"(epochs 2+, {torch.get_num_threads()} threads)"
    )
    print(
        "| strategy | phase | trainable params | epoch time min / median (s) | ratio to full fine-tune "
        "| final val acc |"
    )
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        accs = ", ".join(f"{r['acc']:.3f}" for r in runs)
        for phase, trainable in enumerate(runs[0]["trainable"]):
            times = [t for r in runs for p, t in r["times"] if p == phase]
            med = statistics.median(times)
            label = PHASED[phase]["freeze"] if "phases" in STRATEGIES[name] else STRATEGIES[name]["freeze"]
            print(
                f"| {name} | {phase} ({label}) | {trainable:,} | {min(times):.2f} / {med:.2f} | "
                f"{med / baseline:.2f} | {accs if phase == len(runs[0]['trainable']) - 1 else ''} |"
            )


if __name__ == "__main__":
    main()
