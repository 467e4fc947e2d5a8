"""Fine-tuning strategies compared on the built-in ``textures`` data, same backbone and total epochs.

Accuracy: (a) linear probe (backbone frozen), (b) full fine-tune, (c) gradual unfreezing with layer-wise LR decay
(recipes/phased.yaml's phases), each a real ``Trainer.fit``. Prints, per strategy and phase, the train epoch time
(min / median over the epochs of that phase; validation excluded) with its ratio to the baseline, a full fine-tune
epoch, and the final val accuracy.

Timing: fit epochs are long and, on a shared machine, noisy; ``--what timing`` measures the training step of each
freeze setting of (c) instead, interleaved over rounds so that all settings see the same load, and prints min /
median step time, the epoch time it implies (steps per epoch x median) and the ratio to a full fine-tune step.

    python benchmarks/strategies.py            # EfficientNet-Lite0 (packaged ImageNet weights), 5 epochs, CPU
    python benchmarks/strategies.py --what timing --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from tlkit import ImageDataModule, TransferClassifier
from tlkit.callbacks import FineTuningPhases

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
    return {"acc": trainer.callback_metrics["val/acc"].item(), "times": timer.times, "trainable": _trainable(model)}


def _trainable(model: TransferClassifier) -> list[int]:
    """Trainable parameter count of each phase (entering each phase once, after the run)."""
    phases = next((c for c in model.configure_callbacks() if isinstance(c, FineTuningPhases)), None)
    counts = []
    for index in range(len(phases.phases) if phases else 1):
        if phases:
            phases.enter(model, index, max_epochs=None)
        counts.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
    return counts


def time_steps(rounds: int, steps: int) -> None:
    """Median/min seconds per training step (forward, backward, SGD step) of each phase's freeze setting."""
    data = ImageDataModule(source="textures", image_size=64, batch_size=32, num_workers=0)
    images, labels = torch.randn(32, 3, 64, 64), torch.randint(0, data.num_classes, (32,))
    models, times = {}, {}
    for phase in PHASED:
        model = TransferClassifier(num_classes=data.num_classes, freeze=phase["freeze"], **COMMON).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        models[phase["freeze"]] = (model, torch.optim.SGD(trainable, lr=1e-3, momentum=0.9))
        times[phase["freeze"]] = []
    for _ in range(rounds + 1):  # round 0 warms up allocators and caches, and is dropped
        for freeze, (model, optimizer) in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.zero_grad()
                F.cross_entropy(model(images), labels).backward()
                optimizer.step()
            times[freeze].append((time.perf_counter() - start) / steps)
    per_epoch = len(data.train_dataloader())
    baseline = statistics.median(times["none"][1:])
    print(f"\nbaseline: full fine-tune step, median {baseline * 1000:.0f} ms ({torch.get_num_threads()} threads)")
    print("| freeze | trainable params | step time min / median (ms) | implied epoch time (s) | ratio to full |")
    print("|---|---|---|---|---|")
    for freeze, (model, _) in models.items():
        kept = times[freeze][1:]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        med = statistics.median(kept)
        print(
            f"| {freeze} | {trainable:,} | {min(kept) * 1000:.0f} / {med * 1000:.0f} | {med * per_epoch:.1f} "
            f"| {med / baseline:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", choices=("accuracy", "timing", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_float32_matmul_precision("highest")
    if args.what in ("timing", "both"):
        time_steps(args.rounds, args.steps)
    if args.what in ("accuracy", "both"):
        accuracy(args.epochs, args.seeds)


def accuracy(epochs: int, seeds: list[int]) -> None:
    results = {name: [run(name, epochs, seed) for seed in seeds] for name in STRATEGIES}
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
