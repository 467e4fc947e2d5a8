"""SIGKILL a process while it rewrites last.ckpt, many times: what is left of the checkpoint, and what stray files.

Each round forks a writer that rewrites ``last.ckpt`` back to back (as ModelCheckpoint does each epoch or N steps),
waits until it has written one complete checkpoint, kills it with SIGKILL at a random moment within the next few
writes, and checks the file with tlkit's ``read_checkpoint``. Writers, all with ``TMPDIR`` on another file system
than the checkpoint (``/dev/shm`` by default):

- ``torch.save``: ``torch.save(checkpoint, path)`` straight to the file.
- ``lightning``: Lightning's default ``TorchCheckpointIO`` (fsspec writes to ``TMPDIR``, then moves: a copy across
  file systems).
- ``tlkit``: ``tlkit.AtomicCheckpointIO`` (new content in the checkpoint's own folder, ``fsync``, ``os.replace``),
  on Linux in an unnamed ``O_TMPFILE`` file; ``tlkit-named``: the same with a named temporary file, as on systems
  without ``O_TMPFILE`` (a killed writer's file is removed by the next write).

    python benchmarks/kill_during_write.py [--kills 200] [--mb 32] [--tmpdir /dev/shm] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

import tlkit.io
from tlkit.io import AtomicCheckpointIO
from tlkit.module import read_checkpoint

FORK = multiprocessing.get_context("fork")


def save_with_named_temporary(checkpoint: dict, path: Path) -> None:
    """tlkit where there is no O_TMPFILE (not Linux, or a file system without it): a named temporary file."""
    with mock.patch.object(tlkit.io, "_unnamed_file", return_value=None):
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)


WRITERS: dict[str, Callable[[dict, Path], None]] = {
    "torch.save": lambda checkpoint, path: torch.save(checkpoint, path),
    "lightning": TorchCheckpointIO().save_checkpoint,
    "tlkit": AtomicCheckpointIO().save_checkpoint,
    "tlkit-named": save_with_named_temporary,
}


def rewrite_forever(write: Callable[[dict, Path], None], weights: torch.Tensor, path: Path, ready) -> None:
    step = 0
    while True:
        step += 1
        write({"state_dict": {"w": weights}, "global_step": step}, path)
        ready.set()


def state_of(path: Path) -> str:
    if not path.exists():
        return "missing"
    if path.stat().st_size == 0:
        return "empty"
    try:
        read_checkpoint(path)
    except ValueError:
        return "truncated"
    return "intact"


def strays(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != "last.ckpt"]


def run(name: str, kills: int, weights: torch.Tensor, folder: Path, tmpdir: Path, seed: int) -> dict:
    """Kills ``kills`` writers; counts the states of last.ckpt, the kills that left a new stray file, and the stray
    files left at the end: those in TMPDIR (no writer ever removes them: counted, then deleted to spare the memory of
    a tmpfs) and those next to last.ckpt (which tlkit's next write removes)."""
    write = WRITERS[name]
    folder.mkdir()
    start = time.perf_counter()
    write({"state_dict": {"w": weights}, "global_step": 0}, folder / "last.ckpt")
    seconds = time.perf_counter() - start  # one write, to spread the kills over a few of them
    rng, states = random.Random(seed), Counter()
    kills_leaving_strays, tmpdir_strays, tmpdir_bytes = 0, 0, 0
    for _ in range(kills):
        before = set(strays(folder))
        ready = FORK.Event()
        child = FORK.Process(target=rewrite_forever, args=(write, weights, folder / "last.ckpt", ready), daemon=True)
        child.start()
        if not ready.wait(60):
            raise RuntimeError(f"the {name} writer wrote no checkpoint in 60 s")
        time.sleep(rng.uniform(0, 3 * seconds))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        states[state_of(folder / "last.ckpt")] += 1
        in_tmpdir = strays(tmpdir)
        kills_leaving_strays += bool(in_tmpdir or set(strays(folder)) - before)
        tmpdir_strays += len(in_tmpdir)
        tmpdir_bytes += sum(p.stat().st_size for p in in_tmpdir)
        for path in in_tmpdir:
            path.unlink()
    left = strays(folder)
    return {
        "write_ms": seconds * 1e3,
        "states": states,
        "kills_leaving_strays": kills_leaving_strays,
        "strays_left": tmpdir_strays + len(left),
        "stray_mb": (tmpdir_bytes + sum(p.stat().st_size for p in left)) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs per writer")
    parser.add_argument("--mb", type=float, default=32, help="checkpoint size in MB")
    parser.add_argument("--tmpdir", default="/dev/shm", help="TMPDIR, on another file system than --dir")
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where the checkpoints are written (a temporary subfolder)")  # fmt: skip
    parser.add_argument("--writers", nargs="+", default=list(WRITERS), choices=list(WRITERS))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=".kill_during_write-", dir=args.dir))
    tmp_root = Path(tempfile.mkdtemp(prefix="kill_during_write-", dir=args.tmpdir))
    same = os.stat(work).st_dev == os.stat(tmp_root).st_dev
    weights = torch.randn(int(args.mb * 2**20 / 4))
    print(
        f"{args.kills} SIGKILLs per writer, {args.mb:g} MB checkpoint in {work.parent.resolve()}, TMPDIR={args.tmpdir} "
        f"({'the SAME file system: the copy problem does not show' if same else 'another file system'})"
    )
    print(f"{'writer':<11} {'write ms':>8} {'kills':>6} {'intact':>7} {'truncated':>9} {'empty':>6} {'missing':>7} "
          f"{'kills leaving strays':>20} {'strays left':>11} {'stray MB':>9}")  # fmt: skip
    try:
        for i, name in enumerate(args.writers):
            tmpdir = tmp_root / name
            tmpdir.mkdir()
            os.environ["TMPDIR"] = str(tmpdir)
            tempfile.tempdir = None  # tempfile caches TMPDIR on first use; fsspec asks it for the temporary file
            r = run(name, args.kills, weights, work / name, tmpdir, seed=i)
            s = r["states"]
            print(
                f"{name:<11} {r['write_ms']:8.0f} {args.kills:6d} {s['intact']:7d} {s['truncated']:9d} "
                f"{s['empty']:6d} {s['missing']:7d} {r['kills_leaving_strays']:20d} {r['strays_left']:11d} "
                f"{r['stray_mb']:9.0f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp_root, ignore_errors=True)


if __name__ == "__main__":
    main()
