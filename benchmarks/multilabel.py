"""Multi-label fine-tuning on ``texture-pairs``: packaged ImageNet weights against a random init, same recipe.

Runs ``recipes/multilabel.yaml`` (tf_efficientnet_lite0, 64 px, 5 epochs) with ``pretrained: packaged`` and with
``pretrained: false`` for each seed and prints the final val mAP, micro/macro F1 at 0.5, macro F1 at the tuned
thresholds and the exact-match rate (mean ± std over seeds). Offline; about 1 minute per run on 2 CPU cores.

    python benchmarks/multilabel.py [--seeds 3] [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import lightning as L
import yaml

from tlkit import ImageDataModule, TransferClassifier

RECIPE = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "multilabel.yaml").read_text())
METRICS = ("val/map", "val/f1_micro", "val/f1_macro", "val/f1_macro_tuned", "val/acc")


def run(pretrained: str | bool, seed: int, epochs: int) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    data_args = RECIPE["data"]["init_args"]
    names = ImageDataModule(**data_args)
    args = {**RECIPE["model"]["init_args"], "pretrained": pretrained}
    model = TransferClassifier(**args, num_classes=names.num_classes, class_names=names.class_names, multilabel=True)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True)  # fmt: skip
    trainer.fit(model, ImageDataModule(**data_args, data_config=model.data_config))
    return {key: trainer.callback_metrics[key].item() for key in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    print("| weights | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for label, pretrained in (("packaged ImageNet", "packaged"), ("random init", False)):
        runs = [run(pretrained, seed, args.epochs) for seed in range(args.seeds)]
        cells = []
        for key in METRICS:
            values = [r[key] for r in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
