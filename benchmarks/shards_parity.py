"""The quickstart recipe trained from litdata shards against the same images in a folder: the same accuracy?

Writes the ``textures`` images as JPEG files (quality 95) in a pre-split folder (``train/<class>``, ``val/<class>``),
turns that folder into litdata shards with ``tlkit optimize`` (JPEGs within ``--max_side`` are copied byte for byte,
so both sources decode the same bytes), then fine-tunes ``recipes/quickstart.yaml`` from ``folder:`` and from
``litdata:`` for each seed and prints the final val accuracy of each. The two differ only in the order in which
they stream the training images (litdata shuffles its chunks its own way), so their accuracies should agree within
the spread between seeds.

    python benchmarks/shards_parity.py [--seeds 3] [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import yaml
from PIL import Image

from tlkit import ImageDataModule, TransferClassifier
from tlkit.data.shards import optimize
from tlkit.data.sources import load_source

RECIPE = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text())


def write_folder(root: Path) -> None:
    data = load_source("textures")
    for split_name, split in (("train", data.train), ("val", data.val)):
        for i, (image, label) in enumerate(zip(split.samples, split.targets, strict=True)):
            folder = root / split_name / data.class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.jpg", quality=95)


def fit(source: str, seed: int, epochs: int) -> float:
    L.seed_everything(seed, verbose=False)
    data_args = {**RECIPE["data"]["init_args"], "source": source}
    names = ImageDataModule(**data_args)
    model = TransferClassifier(**RECIPE["model"]["init_args"], num_classes=names.num_classes,
                               class_names=names.class_names)  # fmt: skip
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True)  # fmt: skip
    trainer.fit(model, ImageDataModule(**data_args, data_config=model.data_config))
    return trainer.callback_metrics["val/acc"].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "textures", Path(tmp) / "shards"
        write_folder(folder)
        start = time.perf_counter()
        optimize(source=f"folder:{folder}", out=str(shards))
        print(f"tlkit optimize: {time.perf_counter() - start:.1f} s", flush=True)
        results: dict[str, list[float]] = {}
        for source in (f"folder:{folder}", f"litdata:{shards}"):
            results[source.split(":")[0]] = [fit(source, seed, args.epochs) for seed in range(args.seeds)]
    print("| source | val acc per seed | mean ± std |")
    print("|---|---|---|")
    for name, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} | {', '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(accs):.3f} ± {spread:.3f} |")


if __name__ == "__main__":
    main()
