"""Indexing a large folder: tlkit's cached header index against torchvision ImageFolder's listing, and loading from
litdata shards against the folder loader, on the same images.

Data (written to a temporary folder): ``--small-jpegs`` JPEGs of 128x128 (crops of scikit-image photos, 10 classes)
and ``--photos`` 6-MP photos (3000x2000 JPEGs from scikit-image photos enlarged, with 2 grey levels of noise).

For each set, each in a fresh child process (so that RSS is the index's own, on top of what importing tlkit costs):

- ``ImageFolder(root)``: torchvision's listing (no file is opened);
- ``load_source("folder:root")`` with an empty cache (first run: every file checked from its header) and again
  (second run: listed, and only files not known to be usable ``stat``-ed): seconds, ms per file, and the memory it
  added at its peak over what importing tlkit left resident (VmHWM reset through /proc/self/clear_refs; torch and
  Lightning hold a few hundred MB before any file is read).

Then, on the small JPEGs: ``tlkit optimize`` into shards (timed), and img/s of the training loader (224-px random
crops, 2 workers) from the shards against the folder source.

    nice python benchmarks/index_scale.py [--small-jpegs 100000] [--photos 1000]
    python benchmarks/index_scale.py --small       # 5,000 JPEGs and 50 photos: a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def make_small_jpegs(root: Path, n: int, classes: int = 10, side: int = 128) -> None:
    import skimage.data
    from PIL import Image

    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(photo[y : y + side, x : x + side])).convert("RGB").save(
            folder / f"{i:06d}.jpg", quality=90
        )


def make_photos(root: Path, n: int, classes: int = 4) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from data_throughput import make_photos as make

    make(root, n, classes)


def child(kind: str, root: str, cache: str) -> None:
    """One measurement in this (fresh) process; prints JSON: seconds, files, and the memory the listing or index
    added at its peak (MB), over what the imports left resident."""
    os.environ["TLKIT_CACHE_DIR"] = cache
    from torchvision.datasets import ImageFolder

    from tlkit.data.sources import load_source

    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from the current RSS
    start = time.perf_counter()
    if kind == "imagefolder":
        files = len(ImageFolder(root).samples)
    else:
        data = load_source(f"folder:{root}", val_split=0.1)
        files = len(data.train) + len(data.val) + len(data.skipped)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    print(json.dumps({"seconds": seconds, "files": files, "rss_mb": peak, "added_mb": peak - before}))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def measure(kind: str, root: Path, cache: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(root), str(cache)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def index_report(name: str, root: Path, work: Path) -> None:
    cache = work / f"cache_{name}"
    listing = measure("imagefolder", root, cache)
    first = measure("tlkit", root, cache)
    second = measure("tlkit", root, cache)
    n = first["files"]
    print(f"--- {name}: {n} files")
    print(f"ImageFolder listing      {listing['seconds']:8.2f} s  memory +{listing['added_mb']:.0f} MB at its peak")
    print(
        f"tlkit index, first run   {first['seconds']:8.2f} s  ({first['seconds'] / n * 1e3:.3f} ms per file)"
        f"  memory +{first['added_mb']:.0f} MB at its peak (process {first['rss_mb']:.0f} MB)"
    )
    print(
        f"tlkit index, second run  {second['seconds']:8.2f} s  ({100 * second['seconds'] / first['seconds']:.1f}% of"
        f" the first)  memory +{second['added_mb']:.0f} MB at its peak"
    )


def loader_rate(loader, limit: int) -> float:
    count, start = 0, time.perf_counter()
    for images, _ in loader:
        count += len(images)
        if count >= limit:
            break
    return count / (time.perf_counter() - start)


def shards_report(root: Path, work: Path, images: int) -> None:
    import torch

    from tlkit import ImageDataModule
    from tlkit.data.shards import optimize

    torch.set_num_threads(1)
    out = work / "shards"
    start = time.perf_counter()
    optimize(source=f"folder:{root}", out=str(out), val_split=0.1, num_workers=2)
    print(f"--- shards: tlkit optimize {time.perf_counter() - start:.1f} s")
    kwargs = dict(image_size=224, batch_size=64, num_workers=2, val_split=0.1, interpolation="bilinear")
    modules = {
        "folder": ImageDataModule(source=f"folder:{root}", **kwargs),
        "litdata": ImageDataModule(source=f"litdata:{out}", **kwargs),
    }
    loaders = {name: dm.train_dataloader() for name, dm in modules.items()}
    for loader in loaders.values():
        loader_rate(loader, 256)  # warm-up: workers start, caches fill
    rates = {name: loader_rate(loader, images) for name, loader in loaders.items()}
    for name, rate in rates.items():
        print(f"training loader from {name:8s} {rate:8.1f} img/s")
    print(f"ratio litdata / folder: {rates['litdata'] / rates['folder']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-jpegs", type=int, default=100_000)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--loader-images", type=int, default=4096, help="images timed per loader")
    parser.add_argument("--small", action="store_true", help="a quick run: 5,000 JPEGs, 50 photos, 1,024 images")
    parser.add_argument("--no-shards", action="store_true", help="index times only (optimize takes ~20 ms per file)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.small:
        args.small_jpegs, args.photos, args.loader_images = 5000, 50, 1024
    import warnings

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["TLKIT_CACHE_DIR"] = str(work / "cache")
        small, photos = work / "small", work / "photos"
        start = time.perf_counter()
        make_small_jpegs(small, args.small_jpegs)
        make_photos(photos, args.photos)
        elapsed = time.perf_counter() - start
        print(f"wrote {args.small_jpegs} 128-px JPEGs and {args.photos} 6-MP photos in {elapsed:.0f} s")
        index_report("128-px JPEGs", small, work)
        index_report("6-MP photos", photos, work)
        if not args.no_shards:
            shards_report(small, work, args.loader_images)


if __name__ == "__main__":
    main()
