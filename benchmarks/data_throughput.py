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

``--photos N`` measures a set of N 6-megapixel photos instead (3000x2000 JPEGs, quality 90, ~0.7 MB each: scikit-image
photos enlarged, with sensor-like noise of 2 grey levels so that they compress like camera photos), in both the
training loaders (as above) and the evaluation loaders (baseline: ``Resize(256)`` + ``CenterCrop(224)`` + ``ToTensor``
+ ``Normalize``; tlkit: ``val_dataloader()`` + ``normalize``). tlkit decodes these JPEGs at a reduced DCT scale, never
below what the crop or the resize needs (``reduced_jpeg_decode``); ``--exact`` adds tlkit with full decodes. Also
timed: tlkit's data module setup (its index of the folder, the split and the data config; first and second run)
against ImageFolder's listing (``index_scale.py`` times the index alone). Each pipeline runs
``--warmup`` epochs (3) before the timed ones: the baseline's persistent workers need two to reach their steady rate
(see ``compare``); tlkit's training workers start afresh every epoch (exact resume), so they have no steady state to
reach.

    python benchmarks/data_throughput.py --photos 512 --repeats 5 --exact

An epoch needs at least two batches per worker: with fewer, some workers idle and the epoch times one worker's
latency, not the loader's throughput (64 photos in one batch of 64 measured tlkit at 2.2x the baseline, 512 photos
at 4.6x); the script refuses such a set.
"""

# ruff: noqa: E402 (the variable below must be set before torch is imported)
from __future__ import annotations

import os

# As the `tlkit` command does (see tlkit.cli.main): PyTorch reads this at its first allocation, before any import of it.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import math
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


def make_photos(root: Path, n: int, classes: int = 4, seed: int = 0) -> None:
    """n 6-MP JPEGs (3000x2000): real photos enlarged, plus noise of 2 grey levels (a camera's grain)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    bases = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    for i in range(n):
        base = bases[i % len(bases)].resize((3000, 2000), Image.BICUBIC)
        noisy = np.asarray(base, dtype=np.int16) + rng.normal(0, 2, (2000, 3000, 3)).astype(np.int16)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def baseline_loader(root: Path, batch_size: int, workers: int, train: bool = True) -> tuple[DataLoader, callable]:
    from torchvision import datasets, transforms

    if train:
        view = [transforms.RandomResizedCrop(OUT), transforms.RandomHorizontalFlip()]
    else:
        view = [transforms.Resize(256), transforms.CenterCrop(OUT)]
    transform = transforms.Compose([*view, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    loader = DataLoader(dataset, batch_size, shuffle=train, num_workers=workers, persistent_workers=workers > 0)
    return loader, lambda images: images


def tlkit_module(root: Path, batch_size: int, workers: int, **kwargs) -> tuple[ImageDataModule, float]:
    """The data module, set up (its source loaded: files listed and checked, see tlkit.data.index); and the time.
    Its val split is one image per class: (almost) every image stays in the train split, like ImageFolder's."""
    per_class = min(len(os.listdir(folder)) for folder in root.iterdir())
    kwargs.setdefault("val_split", 1 / per_class)
    dm = ImageDataModule(
        source=f"folder:{root}",
        image_size=OUT,
        batch_size=batch_size,
        num_workers=workers,
        augment="basic",
        mean=MEAN,
        std=STD,
        interpolation="bilinear",
        crop_pct=OUT / 256,  # the baseline's Resize(256) + CenterCrop(224)
        **kwargs,
    )
    start = time.perf_counter()
    dm.setup("fit")
    return dm, time.perf_counter() - start


def tlkit_loader(root: Path, batch_size: int, workers: int) -> tuple[DataLoader, callable, float]:
    dm, scan = tlkit_module(root, batch_size, workers)
    return dm.train_dataloader(), dm.normalize, scan


def eval_loader(dm: ImageDataModule) -> DataLoader:
    """The evaluation loader over the train split's files (as many images as the baseline's ImageFolder)."""
    return dm._loader(dm._dataset(dm.data.train, dm.transform(train=False)))


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


def compare(pipelines: dict[str, tuple[DataLoader, callable]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """img/s of each pipeline per repeat, the pipelines alternating (after ``warmup`` epochs each).

    On photos the baseline's persistent workers reach their steady rate in their third epoch (measured alone: 22, 24,
    40, 41, 41, 46 img/s): its first 18-MB buffers are mapped fresh and returned to the OS, until glibc raises its
    mmap threshold and reuses them. A short warm-up would measure the baseline slower than a long run sees it.
    """
    for loader, finish in pipelines.values():
        for _ in range(warmup):
            epoch_rate(loader, finish)  # workers start, caches fill, allocators settle
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, (loader, finish) in pipelines.items():
            rates[name].append(epoch_rate(loader, finish))
    return rates


def report(rates: dict[str, list[float]], baseline: str) -> None:
    for name, values in rates.items():
        each = " ".join(f"{value:.0f}" for value in values)
        print(f"{name:50s} min {min(values):7.1f}  median {statistics.median(values):7.1f} img/s  (each: {each})")
    base = statistics.median(rates[baseline])
    for name, values in rates.items():
        if name != baseline:
            print(f"ratio {name} / {baseline}: {statistics.median(values) / base:.2f}x")


def listing_time(root: Path) -> float:
    from torchvision import datasets

    start = time.perf_counter()
    datasets.ImageFolder(str(root))
    return time.perf_counter() - start


def photos_main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_photos(root, args.photos)
        listed = listing_time(root)
        dm, first = tlkit_module(root, args.batch_size, args.workers)
        _, second = tlkit_module(root, args.batch_size, args.workers)
        n = args.photos
        print(f"{n} JPEGs of 3000x2000 -> {OUT}x{OUT}, batch {args.batch_size}, {args.workers} workers")
        print(
            f"ImageFolder listing: {listed:.3f} s; tlkit setup: first run {first:.3f} s ({first / n * 1e3:.2f} ms per"
        )
        print(f"  file), second run {second:.3f} s ({100 * second / first:.1f}% of the first)")
        for train in (True, False):
            print(f"--- {'training' if train else 'evaluation'} loaders")
            pipelines = {"baseline ImageFolder+PIL": baseline_loader(root, args.batch_size, args.workers, train)}
            variants = {"tlkit": dm}
            if args.exact:
                variants["tlkit, full decodes"] = tlkit_module(
                    root, args.batch_size, args.workers, reduced_jpeg_decode=False
                )[0]
            for name, module in variants.items():
                loader = module.train_dataloader() if train else eval_loader(module)
                pipelines[name] = (loader, module.normalize)
            report(compare(pipelines, args.repeats, args.warmup), "baseline ImageFolder+PIL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--photos", type=int, default=0, help="measure N 6-MP photos instead of small JPEGs")
    parser.add_argument("--exact", action="store_true", help="with --photos: also tlkit with full decodes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3, help="with --photos: epochs of each pipeline before timing")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--main-threads", type=int, default=1)
    args = parser.parse_args()
    images = args.photos or args.images
    if args.workers and images < 2 * args.workers * args.batch_size:
        parser.error(
            f"{images} images make {math.ceil(images / args.batch_size)} batch(es) of {args.batch_size}: fewer than "
            f"two per worker ({args.workers} workers), so an epoch would time one worker's latency; use at least "
            f"{2 * args.workers * args.batch_size} images or a smaller --batch-size"
        )
    torch.set_num_threads(args.main_threads)
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")  # torchvision 0.29
    torch.manual_seed(0)
    os.environ["TLKIT_CACHE_DIR"] = tempfile.mkdtemp()  # a fresh image index: the first run checks every file
    if args.photos:
        photos_main(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root, args.images)
        base, base_finish = baseline_loader(root, args.batch_size, args.workers)
        ours, ours_finish, scan = tlkit_loader(root, args.batch_size, args.workers)
        print(f"{args.images} JPEGs of {SIDE}x{SIDE} -> {OUT}x{OUT}, batch {args.batch_size}, {args.workers} workers")
        print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')} (set by this script unless given)")
        print(f"tlkit index, first run ({len(ours.dataset)} train files): {scan:.2f} s")
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
