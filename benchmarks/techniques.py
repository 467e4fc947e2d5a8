"""Fine-tuning techniques on `textures`, and on a few-label split of it: val accuracy (mean ± std over seeds) and wall
time of each, at the same epochs.

Configurations (the model and data of ``recipes/quickstart.yaml`` unless said):

- ``quickstart``: the recipe as it is.
- ``+mixup``: mixup 0.2 / CutMix 1.0 (switch 0.5), off for the last epoch.
- ``+ema``: an EMA of the weights (``ema_decay`` 0.9: about the last 10 steps; the runs have 20-75 steps).
- ``+soup``: the quickstart run's per-epoch checkpoints, greedy soup (selected on val, so its val score is
  optimistic by construction; time: the run plus the soup).
- ``+tta``: the quickstart run's final model, validated with ``tta="flip"`` (time: the run plus the TTA pass).
- ``strong``: ``recipes/strong.yaml``.
- ``lp_ft``: ``recipes/lp_ft.yaml`` (the head starts as the converged linear probe, BatchNorm keeps the pretrained
  statistics, every weight fine-tunes at lr 0.002; time includes fitting the probe); ``lp_ft +tta``: its final
  model validated with ``tta="flip"``.
- ``linear probe``: ``recipes/linear_probe.yaml`` (features extracted once, L-BFGS to convergence), the reference.

Data: ``textures`` (480 train / 160 val, 64 px) and ``few-label``: 10 train images per class (the first 10 of each
class in the textures train split), the same 160 val images. Every run uses the same epochs (the quickstart's, 5)
and seeds 0..N-1 (with the data module's seed following the run's).

    python benchmarks/techniques.py [--seeds 3] [--epochs 5] [--data textures few-label] [--quick]

``--quick``: one seed, one epoch of 3 batches, 2 val batches: checks that every configuration runs (numbers
meaningless).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torchvision.io import write_png

from tlkit import ImageDataModule, LinearProbe, TransferClassifier
from tlkit.soup import make_soup

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FEW_LABELS = 10  # train images per class of the few-label split


def init_args(recipe: str, section: str) -> dict[str, Any]:
    return dict(yaml.safe_load((RECIPES / recipe).read_text())[section]["init_args"])


def few_label_folder(root: Path) -> str:
    """The textures data as a pre-split image folder: the first ``FEW_LABELS`` train images of each class, all val."""
    data = ImageDataModule("textures").data
    for split, samples, targets in (("train", data.train.samples, data.train.targets),
                                    ("val", data.val.samples, data.val.targets)):  # fmt: skip
        written: dict[int, int] = {}
        for image, label in zip(samples, targets, strict=True):
            if split == "train" and written.get(label, 0) >= FEW_LABELS:
                continue
            folder = root / split / data.class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            index = written[label] = written.get(label, 0) + 1
            write_png(torch.from_numpy(image).permute(2, 0, 1).contiguous(), str(folder / f"{index:04d}.png"))
    return f"folder:{root}"


class Bench:
    """One data set, the trainer settings, and the runs of each configuration."""

    def __init__(self, source: str, epochs: int, quick: bool, workdir: Path):
        self.source, self.epochs, self.quick, self.workdir = source, epochs, quick, workdir

    def trainer(self, run_dir: Path | None = None, **kwargs: Any) -> L.Trainer:
        limits = dict(limit_train_batches=3, limit_val_batches=2) if self.quick else {}
        callbacks = [ModelCheckpoint(run_dir, filename="{epoch}", save_top_k=-1)] if run_dir else []
        return L.Trainer(**{
            "max_epochs": self.epochs, "deterministic": True, "logger": False, "enable_checkpointing": bool(run_dir),
            "callbacks": callbacks, "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu",
            **limits, **kwargs,
        })  # fmt: skip

    def build(self, recipe: str, model_overrides: dict[str, Any] | None = None, model_class: type = TransferClassifier):
        data = {**init_args(recipe, "data"), "source": self.source}
        args = {**init_args(recipe, "model"), **(model_overrides or {})}
        probe = ImageDataModule(**data)
        model = model_class(**args, num_classes=probe.num_classes, class_names=probe.class_names)
        return model, ImageDataModule(**data, data_config=model.data_config)

    def fine_tune(self, seed: int, recipe: str = "quickstart.yaml", run_dir: Path | None = None,
                  **overrides: Any) -> tuple[float, float, TransferClassifier, ImageDataModule]:  # fmt: skip
        L.seed_everything(seed, verbose=False)
        model, dm = self.build(recipe, overrides)
        trainer = self.trainer(run_dir)
        start = time.perf_counter()
        trainer.fit(model, dm)
        return trainer.callback_metrics["val/acc"].item(), time.perf_counter() - start, model, dm

    def flip_tta(self, model: TransferClassifier, dm: ImageDataModule) -> tuple[float, float]:
        """Val accuracy of ``model`` with flip TTA, and the seconds it took."""
        start = time.perf_counter()
        tta = TransferClassifier(**{**model.hparams, "tta": "flip"})
        tta.load_state_dict(model.state_dict())
        metrics = self.trainer().validate(tta, datamodule=dm, verbose=False)[0]
        return metrics["val/tta_acc"], time.perf_counter() - start

    def lp_ft(self, seed: int) -> dict[str, tuple[float, float]]:
        acc, seconds, model, dm = self.fine_tune(seed, recipe="lp_ft.yaml")
        tta_acc, tta_seconds = self.flip_tta(model, dm)
        return {"lp_ft": (acc, seconds), "lp_ft +tta": (tta_acc, seconds + tta_seconds)}

    def quickstart_soup_tta(self, seed: int) -> dict[str, tuple[float, float]]:
        run_dir = self.workdir / f"{Path(self.source).name}-{seed}"
        acc, seconds, model, dm = self.fine_tune(seed, run_dir=run_dir)
        results = {"quickstart": (acc, seconds)}
        start = time.perf_counter()
        checkpoints = sorted(run_dir.glob("epoch=*.ckpt"))
        if len(checkpoints) >= 2:
            limit = {"trainer_kwargs": dict(limit_val_batches=2), "bn_batches": 3} if self.quick else {}
            soup = make_soup(checkpoints, run_dir / "soup.ckpt", greedy=True, datamodule=dm, **limit)
            results["+soup"] = (soup.val_acc, seconds + time.perf_counter() - start)
        tta_acc, tta_seconds = self.flip_tta(model, dm)
        results["+tta"] = (tta_acc, seconds + tta_seconds)
        return results

    def linear_probe(self, seed: int) -> tuple[float, float]:
        L.seed_everything(seed, verbose=False)
        recipe = yaml.safe_load((RECIPES / "linear_probe.yaml").read_text())
        train = ImageDataModule(**{**init_args("linear_probe.yaml", "data"), "source": self.source}).data.train
        # the recipe's weight decay is 1/N (LogisticRegression's C=1) for textures' N; this split's own N here
        model, dm = self.build("linear_probe.yaml", {"weight_decay": 1 / len(train)}, model_class=LinearProbe)
        trainer = self.trainer(max_epochs=1 if self.quick else recipe["trainer"]["max_epochs"])
        start = time.perf_counter()
        trainer.fit(model, model.feature_data(dm))
        return trainer.callback_metrics["val/acc"].item(), time.perf_counter() - start


def configurations(bench: Bench) -> dict[str, Callable[[int], dict[str, tuple[float, float]]]]:
    last = max(bench.epochs - 1, 1)

    def single(name: str, **overrides: Any) -> Callable[[int], dict[str, tuple[float, float]]]:
        return lambda seed: {name: bench.fine_tune(seed, **overrides)[:2]}

    return {
        "quickstart": bench.quickstart_soup_tta,  # also +soup and +tta, from the same run
        "+mixup": single("+mixup", mixup_alpha=0.2, cutmix_alpha=1.0, mixup_off_epoch=last),
        "+ema": single("+ema", ema_decay=0.9),
        "strong": single("strong", recipe="strong.yaml"),
        "lp_ft": bench.lp_ft,  # also lp_ft +tta, from the same run
        "linear probe": lambda seed: {"linear probe": bench.linear_probe(seed)},
    }


ORDER = ("quickstart", "+mixup", "+ema", "+soup", "+tta", "strong", "lp_ft", "lp_ft +tta", "linear probe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--data", nargs="+", default=["textures", "few-label"], choices=["textures", "few-label"])
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch of 3 batches: a smoke test")
    args = parser.parse_args()
    seeds, epochs = (1, 1) if args.quick else (args.seeds, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sources = {"textures": "textures", "few-label": lambda: few_label_folder(workdir / "few")}
        print(f"| data | configuration | val acc (mean ± std, {seeds} seeds) | wall time (s) |")
        print("|---|---|---|---|")
        for data in args.data:
            source = sources[data]() if callable(sources[data]) else sources[data]
            bench = Bench(source, epochs, args.quick, workdir)
            results: dict[str, list[tuple[float, float]]] = {}
            for name, run in configurations(bench).items():
                if args.only and name not in args.only:
                    continue
                for seed in range(seeds):
                    for config, result in run(seed).items():
                        results.setdefault(config, []).append(result)
                        print(f"# {data} {config} seed {seed}: val acc {result[0]:.4f}, {result[1]:.0f} s", flush=True)
            for config in (c for c in ORDER if c in results):
                accs, times = zip(*results[config], strict=True)
                spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
                print(f"| {data} | {config} | {statistics.mean(accs):.3f} ± {spread:.3f} | "
                      f"{statistics.mean(times):.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
