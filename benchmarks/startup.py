"""Start-up time of the ``tlkit`` command against ``python -c "import torch"``, same run.

``python -c "import timm"`` is timed too: ``tlkit backbones`` lists timm's registry, which exists once timm has
imported all its model definitions (and torchvision, which timm imports), so that is its floor. Each command runs
``--repeats`` times, all interleaved so that load from other processes hits each alike; prints the median wall time
of each and the ratios of the medians (goal: at most 1.5x for ``tlkit --help`` and ``tlkit backbones``). A first
untimed round warms the file cache.

    python benchmarks/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

TLKIT = [shutil.which("tlkit")] if shutil.which("tlkit") else [sys.executable, "-m", "tlkit.cli"]  # the console script
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "tlkit --help": [*TLKIT, "--help"],
    "tlkit backbones": [*TLKIT, "backbones"],
    "import timm": [sys.executable, "-c", "import timm"],  # what `tlkit backbones` cannot do without (its registry)
}


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TLKIT_DEBUG": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{sys.executable}; tlkit: {' '.join(TLKIT)}; {os.cpu_count()} CPUs, load {os.getloadavg()}")
    for command in COMMANDS.values():
        wall_time(command)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            times[name].append(wall_time(command))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:16s} median {medians[name]:.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
    base = medians["import torch"]
    for name in ("tlkit --help", "tlkit backbones"):
        print(f"{name} / import torch: {medians[name] / base:.2f}x")


if __name__ == "__main__":
    main()
