"""Resume parity: max |Δw| between an uninterrupted run and the same run resumed from a checkpoint (0 = bit-identical).

The run is tests/_resume_run.py: test_efficientnet at 32 px on the textures source, 2 fine-tuning phases (the change
after epoch 0), 3 epochs of 5 shuffled batches of 8, ``augment="basic"`` in 2 loader workers, head dropout 0.3, on
the CPU. Rows: resumed from an epoch-end checkpoint (end of epoch 1), from a mid-epoch one (step 9), from the end of
epoch 0 (so the resumed run makes the phase change), 2-process gloo DDP resumed mid-epoch (step 6), and a run killed
with SIGKILL at a seeded random step, resumed from ``last.ckpt``. Each run is a separate process.

Measure the code of any checkout by putting it first on the path (the helper script is taken from this one)::

    PYTHONPATH=/path/to/checkout nice -n 10 python benchmarks/resume_parity.py
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "_resume_run.py"
TOTAL_STEPS = 15


def train(out: Path, tag: str, *args: str) -> int:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), str(out), tag, *args]
    return subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def max_abs_difference(out: Path, a: str, b: str, rank: int = 0) -> float:
    wa = torch.load(out / f"{a}_rank{rank}.pt", weights_only=True)["weights"]
    wb = torch.load(out / f"{b}_rank{rank}.pt", weights_only=True)["weights"]
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-seed", type=int, default=12)
    args = parser.parse_args()
    import tlkit

    print(f"tlkit from {Path(tlkit.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (single := out / "single").mkdir()
        train(single, "full")
        rows = []
        for name, checkpoint in [
            ("epoch end (end of epoch 1)", "end-epoch=1.ckpt"),
            ("mid-epoch (step 9 of 15)", "epoch=1-step=9.ckpt"),
            ("phase change (from end of epoch 0)", "end-epoch=0.ckpt"),
        ]:
            (resumed := out / checkpoint).mkdir()
            train(resumed, "resumed", "--resume", str(single / checkpoint))
            (resumed / "full_rank0.pt").symlink_to(single / "full_rank0.pt")
            rows.append((name, max_abs_difference(resumed, "full", "resumed")))
        (ddp := out / "ddp").mkdir()
        train(ddp, "full", "--devices", "2")
        (ddp_resumed := out / "ddp_resumed").mkdir()
        train(ddp_resumed, "resumed", "--devices", "2", "--resume", str(ddp / "epoch=1-step=6.ckpt"))
        for rank in (0, 1):
            (ddp_resumed / f"full_rank{rank}.pt").symlink_to(ddp / f"full_rank{rank}.pt")
        ddp_diff = max(max_abs_difference(ddp_resumed, "full", "resumed", rank) for rank in (0, 1))
        rows.append(("2-process DDP, mid-epoch (step 6), worst rank", ddp_diff))
        step = random.Random(args.kill_seed).randint(2, TOTAL_STEPS - 1)
        (killed := out / "killed").mkdir()
        code = train(killed, "killed", "--kill-at-step", str(step))
        (killed_resumed := out / "killed_resumed").mkdir()
        train(killed_resumed, "resumed", "--resume", str(killed / "last.ckpt"))
        (killed_resumed / "full_rank0.pt").symlink_to(single / "full_rank0.pt")
        rows.append(
            (
                f"SIGKILL after step {step} (exit {code}), last.ckpt",
                max_abs_difference(killed_resumed, "full", "resumed"),
            )
        )
    for name, diff in rows:
        print(f"| {name} | {diff:.3g} |")


if __name__ == "__main__":
    main()
