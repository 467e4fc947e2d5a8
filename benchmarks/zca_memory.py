"""Peak memory of fitting image-scope ZCA on 10,000 CIFAR-sized images (3x32x32), against its budget.

Budget (issue 3): twice (one batch + the covariance matrix). tlkit streams batches into float64 running sums, so its
peak should not depend on the number of images. Baseline: the textbook fit that stacks the whole train set as one
float64 matrix, then ``torch.cov`` + ``torch.linalg.eigh``.

Each measurement runs in a fresh process that reads the images batch by batch from a file and first does one fit of
the same size on random data (so libraries loading, e.g. BLAS thread buffers, is not counted); it then resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``, Linux) and reports ``VmHWM - VmRSS`` around the fit alone.
glibc's mmap threshold is fixed at 128 KiB in both processes so freed buffers leave RSS at once (otherwise glibc keeps
some freed heap pages resident, which is not live memory).

    python benchmarks/zca_memory.py [--images 10000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZE = 32
DIM = 3 * SIZE * SIZE
MIB = 2**20
NAMES = {"baseline": "baseline (stack all, torch.cov, eigh)", "tlkit": "tlkit Whitening.fit (streaming)"}


def make_images(n: int, seed: int = 0) -> np.ndarray:
    """n random 32x32 crops of scikit-image photos, taken at random scales (real image statistics)."""
    import skimage.data
    from skimage.transform import rescale

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
    photos = [getattr(skimage.data, name)() for name in names]
    rng = np.random.default_rng(seed)
    pyramid = [
        (rescale(p, s, channel_axis=-1, anti_aliasing=True) * 255).astype(np.uint8)
        for p in photos
        for s in (0.125, 0.25, 0.5)
    ]
    out = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
    for i in range(n):
        img = pyramid[rng.integers(len(pyramid))]
        y, x = rng.integers(0, img.shape[0] - SIZE), rng.integers(0, img.shape[1] - SIZE)
        out[i] = img[y : y + SIZE, x : x + SIZE].transpose(2, 0, 1)
    return out


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _read_batches(path: str, batch_size: int):  # noqa: ANN202
    """uint8 (N, 3, 32, 32) batches read from the raw file with plain reads (page cache, not this process's RSS)."""
    import torch

    with open(path, "rb") as f:
        while chunk := f.read(batch_size * DIM):
            yield torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(-1, 3, SIZE, SIZE)


def _child(path: str, method: str, batch_size: int) -> None:
    import torch

    from tlkit.data.preprocess import Whitening

    torch.set_num_threads(2)
    # Warm-up: one fit of the same size on random data first, so the measurement is the fit's own memory and not
    # libraries loading (SciPy's LAPACK, BLAS thread buffers): what every later fit in the process sees.
    warm = torch.rand(300, 3, SIZE, SIZE, dtype=torch.float64)
    if method == "tlkit":
        Whitening("zca", scope="image", image_size=SIZE).fit([warm.float()])
    else:
        torch.linalg.eigh(torch.cov(warm.flatten(1).T))
    del warm
    module = Whitening("zca", scope="image", image_size=SIZE)  # buffers allocated before the measurement
    batches = _read_batches(path, batch_size)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    start = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if method == "tlkit":
        module.fit(b.float().div_(255) for b in batches)
    else:  # baseline: the whole train set in memory at once
        data = torch.cat([b.reshape(len(b), -1).double() / 255 for b in batches])
        evals, evecs = torch.linalg.eigh(torch.cov(data.T, correction=0))
        module.matrix.copy_(evecs @ torch.diag((evals + module.eps).rsqrt()) @ evecs.T)
    seconds = time.perf_counter() - t0
    print(f"{(_status_kib('VmHWM') - start) / 1024:.1f} {seconds:.2f}")


def measure(path: str, method: str, batch_size: int) -> tuple[float, float]:
    """(peak MiB above the start of the fit, seconds) in a fresh process."""
    # A fixed mmap threshold turns off glibc's dynamic one, so every large buffer is returned to the system when freed
    # and RSS follows the live allocations (same setting for both methods).
    pythonpath = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "MALLOC_MMAP_THRESHOLD_": "131072"}
    args = [sys.executable, __file__, "--child", path, "--method", method, "--batch-size", str(batch_size)]
    out = subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="tlkit", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.method, args.batch_size)
        return
    batch_mib = args.batch_size * DIM * 4 / MIB  # a float32 batch, as the data module feeds it
    cov_mib = DIM * DIM * 8 / MIB  # the float64 covariance
    budget = 2 * (batch_mib + cov_mib)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.u8")
        make_images(args.images).tofile(path)
        print(f"image-scope ZCA, {args.images} images of 3x{SIZE}x{SIZE} (D={DIM}), batches of {args.batch_size}")
        print(f"float32 batch {batch_mib:.1f} MiB + float64 covariance {cov_mib:.1f} MiB; budget 2x = {budget:.1f} MiB")
        results = {}
        for method in ("baseline", "tlkit"):
            runs = [measure(path, method, args.batch_size) for _ in range(args.repeats)]
            peak, seconds = max(r[0] for r in runs), min(r[1] for r in runs)
            results[method] = peak
            name = NAMES[method]
            print(f"{name:40s} peak +{peak:7.1f} MiB  ({peak / budget:.2f} x budget)  fit {seconds:.1f} s")
        verdict = "within" if results["tlkit"] <= budget else "OVER"
        print(f"ratio baseline/tlkit peak: {results['baseline'] / results['tlkit']:.2f}x; tlkit is {verdict} budget")


if __name__ == "__main__":
    main()
