"""CPU inference latency of a model with BatchNorm folded into its convolutions vs the unfolded model.

Baseline: tf_efficientnet_lite0 (packaged ImageNet weights) in eval mode, BatchNorm layers as separate ops.
tlkit: the same model after `tlkit.export.fold_batchnorm`. Both eager PyTorch, `torch.inference_mode`, 224 px,
batch 1 and 32; each timing is the median of several runs after warm-up, and the pair is measured interleaved.

    python benchmarks/fold_bn_latency.py [--size 224] [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tlkit import create_backbone
from tlkit.export import fold_batchnorm


def latency(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on shared CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = create_backbone(args.backbone, pretrained="packaged").eval()
    folded, count = fold_batchnorm(model)
    print(f"{args.backbone}: {count} BatchNorm layers folded; {args.size} px; {args.threads} thread(s)")
    for batch in (1, 32):
        x = torch.rand(batch, 3, args.size, args.size)
        repeats = args.repeats if batch == 1 else max(3, args.repeats // 3)
        with torch.inference_mode():
            diff = (model(x) - folded(x)).abs().max().item()
            times = {"unfolded": [], "folded": []}
            for _ in range(repeats):
                times["unfolded"].append(latency(model, x))
                times["folded"].append(latency(folded, x))
        base, ours = statistics.median(times["unfolded"]), statistics.median(times["folded"])
        best = min(times["unfolded"]) / min(times["folded"])
        print(
            f"  batch {batch:2d}: unfolded {base * 1e3:8.1f} ms  folded {ours * 1e3:8.1f} ms  "
            f"ratio {base / ours:.2f}x  (min/min {best:.2f}x; max abs diff {diff:.1e})"
        )


if __name__ == "__main__":
    main()
