"""Start-up time of the ``tlkit`` command against ``python -c "import torch"``, same run.

``tlkit backbones`` lists timm's registry, which exists only once timm has imported all its model definitions (and
torchvision), so its first run after an install costs ``import timm``; it keeps the names in the user's cache (one
file per installed timm/torchvision), and later runs read them there. Both are timed: "uncached" runs with an empty
``XDG_CACHE_HOME`` each time, and ``python -c "import timm"`` is shown for reference. Each command runs ``--repeats``
times, all interleaved so that load from other processes hits each alike; prints the median wall time of each and
the ratios of the medians (goal: at most 1.5x for ``tlkit --help`` and ``tlkit backbones``). A first untimed round
warms the file cache (and tlkit's).

    python benchmarks/startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TLKIT = [shutil.which("tlkit")] if shutil.which("tlkit") else [sys.executable, "-m", "tlkit.cli"]  # the console script
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "tlkit --help": [*TLKIT, "--help"],
    "tlkit backbones": [*TLKIT, "backbones"],
    "tlkit backbones, uncached": [*TLKIT, "backbones"],
    "import timm": [sys.executable, "-c", "import timm"],
}


def wall_time(name: str) -> float:
    env = {**os.environ, "TLKIT_DEBUG": "1"}
    with tempfile.TemporaryDirectory() as empty:
        if name.endswith("uncached"):
            env["XDG_CACHE_HOME"] = empty
        start = time.perf_counter()
        subprocess.run(COMMANDS[name], check=True, stdout=subprocess.DEVNULL, env=env)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{sys.executable}; tlkit: {' '.join(TLKIT)}; {os.cpu_count()} CPUs, load {os.getloadavg()}")
    for name in COMMANDS:
        wall_time(name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name in COMMANDS:
            times[name].append(wall_time(name))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:26s} median {medians[name]:.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
    for name in COMMANDS:
        if name != "import torch":
            print(f"{name} / import torch: {medians[name] / medians['import torch']:.2f}x")


if __name__ == "__main__":
    main()
