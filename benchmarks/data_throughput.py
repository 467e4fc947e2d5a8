"""Training-loader throughput: tlkit's uint8 pipeline against the standard torchvision pipeline, same settings.

Data: about 2,000 JPEG photos of 256x256 px in 10 class folders, cut from scikit-image's real photos (random crops at
random scales, resized), written to a temporary folder.

- baseline: ``torchvision.datasets.ImageFolder`` + PIL ``RandomResizedCrop`` + ``RandomHorizontalFlip`` +
  ``ToTensor`` + ``Normalize`` in the workers (float32 batches).
- tlkit: ``ImageDataModule(augment="basic").train_dataloader()``: torchvision.io decode to uint8, uint8
  ``v2.RandomResizedCrop`` + flip in the workers (uint8 batches), then ``dm.normalize`` (float + mean/std) in the main
  process, where it runs on the device in training. Here the device is the CPU, so its cost is counted. The
  script turns on PyTorch's huge-page allocation of large CPU tensors as the ``tlkit`` command does
  (``THP_MEM_ALLOC_ENABLE=1``; run with ``THP_MEM_ALLOC_ENABLE=0`` to see the cost of page faults). Both pipelines
  run in this one process and its workers, so both get it; only tlkit allocates large tensors in the main process.

Both: 224-px output, bilinear antialiased resize, batch size 64, 2 workers, persistent workers, shuffled; the main
process uses one intra-op thread (``--main-threads``), so main + 2 workers fit 2 cores (the baseline's main process
does no tensor math, so this only matters for tlkit's normalisation). Each
measurement is one full epoch after a warm-up epoch; the two pipelines alternate so that load from other processes
hits both alike. Every batch is then read once in the main process (one element per memory page, see
``first_read``), as a model's first layer would. Prints min / median img/s of each and the ratio of the medians;
also the tlkit loader alone, i.e. with the normalisation left to an accelerator, and the baseline with its batches
never read (the protocol of earlier versions of this script); neither counts in the headline ratio. tlkit's one-time
bad-image scan (every file decoded once, before the split) is timed separately.

    python benchmarks/data_throughput.py [--images 2000] [--repeats 5] [--workers 2] [--batch-size 64]
"""

# ruff: noqa: E402 (the variable below must be set before torch is imported)
from __future__ import annotations

import os

# As the `tlkit` command does (see tlkit.cli.main): PyTorch reads this at its first allocation, before any import of it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tlkit import ImageDataModule

SIDE = 256
OUT = 224
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    """n JPEGs of SIDE x SIDE: random square crops (96 px up to the photo's short side) of real photos, resized."""
    import skimage.data

    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(96, min(photo.shape[:2]) + 1))
        y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((SIDE, SIDE), Image.BICUBIC)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:05d}.jpg", quality=90)


def baseline_loader(root: Path, batch_size: int, workers: int) -> tuple[DataLoader, callable]:
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(OUT),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(dataset, batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    return loader, lambda images: images


def tlkit_loader(root: Path, batch_size: int, workers: int) -> tuple[DataLoader, callable, float]:
    dm = ImageDataModule(
        source=f"folder:{root}",
        image_size=OUT,
        batch_size=batch_size,
        num_workers=workers,
        val_split=0.01,  # keep (almost) every image in the train split, like the baseline's ImageFolder
        augment="basic",
        mean=MEAN,
        std=STD,
        interpolation="bilinear",
    )
    start = time.perf_counter()
    dm.setup("fit")  # loads the source: lists the files and decodes each once (the bad-image scan)
    scan = time.perf_counter() - start
    return dm.train_dataloader(), dm.normalize, scan


def first_read(images: torch.Tensor) -> torch.Tensor:
    """The model's first read of a batch, cut down to one element per 4 KiB page. A worker hands its batch over in
    shared memory that the main process maps page by page on first access: the baseline pays that in training too
    (when its first layer reads the batch), tlkit already inside ``normalize``."""
    images.reshape(-1)[:: 4096 // images.element_size()].sum()
    return images


def epoch_rate(loader: DataLoader, finish: callable, read: callable = first_read) -> float:
    """Images per second over one epoch, including the final normalisation of every batch and its first read."""
    count, start = 0, time.perf_counter()
    for images, _ in loader:
        count += len(read(finish(images)))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--main-threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.main_threads)
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")  # torchvision 0.29
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root, args.images)
        base, base_finish = baseline_loader(root, args.batch_size, args.workers)
        ours, ours_finish, scan = tlkit_loader(root, args.batch_size, args.workers)
        print(f"{args.images} JPEGs of {SIDE}x{SIDE} -> {OUT}x{OUT}, batch {args.batch_size}, {args.workers} workers")
        print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')} (set by this script unless given)")
        print(f"tlkit bad-image scan (once per run, {len(ours.dataset)} train files): {scan:.2f} s")
        epoch_rate(base, base_finish), epoch_rate(ours, ours_finish)  # warm-up: workers start, caches fill
        rates: dict[str, list[float]] = {"baseline": [], "tlkit": [], "loader": [], "unread": []}
        for _ in range(args.repeats):
            rates["baseline"].append(epoch_rate(base, base_finish))
            rates["tlkit"].append(epoch_rate(ours, ours_finish))
            rates["loader"].append(epoch_rate(ours, lambda images: images))
            rates["unread"].append(epoch_rate(base, base_finish, read=lambda images: images))
        labels = {
            "baseline": "baseline ImageFolder+PIL+ToTensor+Normalize",
            "tlkit": "tlkit uint8 loader + normalize (on CPU)",
            "loader": "(tlkit loader alone, normalize on a GPU)",
            "unread": "(baseline, batches never read)",
        }
        for name, values in rates.items():
            print(f"{labels[name]:45s} min {min(values):7.1f}  median {statistics.median(values):7.1f} img/s")
        base_median = statistics.median(rates["baseline"])
        print(f"ratio tlkit / baseline (medians): {statistics.median(rates['tlkit']) / base_median:.2f}x")
        print(f"(ratio loader alone / baseline: {statistics.median(rates['loader']) / base_median:.2f}x)")
        unread = statistics.median(rates["unread"])
        ours_median = statistics.median(rates["tlkit"])
        print(f"(ratio tlkit / baseline with its batches never read: {ours_median / unread:.2f}x)")


if __name__ == "__main__":
    main()
