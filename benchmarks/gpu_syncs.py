"""Host-device synchronisations in tlkit's training steps, found with CUDA's sync debug mode.

Trains benchmarks/overhead.py's tlkit setup (the same TransferClassifier, on-device data module and Trainer) for
``--steps`` steps. From the start of batch ``--from-step`` to the end of the last one,
``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call warn; each distinct call site (its
innermost frames in tlkit/, lightning/ or torchmetrics/, and the line that synchronised) is printed with its count.
Each synchronisation makes the CPU wait for the GPU to run everything queued, so the Python that follows it (hooks,
logging, the next batch) runs while the GPU idles: a step should have none.

    python benchmarks/gpu_syncs.py --device cuda --model resnet50 --image-size 224 --batch-size 256 \\
        --precision bf16-mixed --channels-last [--compile] [--logger] [--progress-bar] [--strict]
    python benchmarks/gpu_syncs.py            # CPU: runs the same fit without the sync mode (it needs CUDA)
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import add_setting_arguments, make_batches, tlkit_fit  # noqa: E402  (the benchmark's setup, not a copy of it)

from tlkit.tracking import TrainingSpeed  # noqa: E402

SYNC_MESSAGE = "called a synchronizing CUDA operation"
LIBRARIES = re.compile(r"[/\\](tlkit|lightning|torchmetrics)[/\\]")
FRAMES = 3  # frames of the libraries shown per call site, innermost first


class SyncDebug(L.Callback):
    """Sync debug mode on from the start of batch ``start`` to the end of batch ``stop`` (whole steps: the work
    Lightning does between batches included, except after the last)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.start:
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.stop:
            torch.cuda.set_sync_debug_mode("default")


def call_site(stack: list[traceback.FrameSummary]) -> tuple[str, str]:
    """The innermost frames of the stack in tlkit/, lightning/ or torchmetrics/, and the line that synchronised."""
    ours = [frame for frame in stack if LIBRARIES.search(frame.filename)][-FRAMES:][::-1]
    return " <- ".join(_where(frame) for frame in ours) or "(outside tlkit/lightning/torchmetrics)", _where(stack[-1])


def _where(frame: traceback.FrameSummary) -> str:
    path = re.sub(r".*[/\\](site-packages|dist-packages)[/\\]", "", frame.filename)
    path = re.sub(r".*[/\\](?=(tlkit|benchmarks)[/\\])", "", path)
    return f"{path}:{frame.lineno} {frame.name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting_arguments(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--from-step", type=int, default=5, help="first batch run in sync debug mode")
    parser.add_argument("--logger", action="store_true", help="a CSV logger and TrainingSpeed, as `tlkit fit` has")
    parser.add_argument("--log-every-n-steps", type=int, default=50)
    parser.add_argument("--progress-bar", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any step synchronises")
    args = parser.parse_args()
    if not 0 < args.from_step < args.steps:
        parser.error(f"--from-step must be in [1, --steps); got {args.from_step} of {args.steps}")
    args.warmup = args.from_step  # overhead.tlkit_fit's stopwatch synchronises once, just before this batch
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    callbacks = [SyncDebug(args.from_step, args.steps - 1)] if cuda else []
    options = dict(enable_progress_bar=args.progress_bar, log_every_n_steps=args.log_every_n_steps)
    run_dir = tempfile.TemporaryDirectory(prefix="gpu_syncs_")
    if args.logger:
        callbacks.append(TrainingSpeed())
        options.update(logger=CSVLogger(run_dir.name), default_root_dir=run_dir.name)

    sites: collections.Counter[tuple[str, str]] = collections.Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE in str(message):
            stack = [frame for frame in traceback.extract_stack()[:-1] if Path(frame.filename).name != "warnings.py"]
            sites[call_site(stack)] += 1
        else:
            show(message, category, filename, lineno, file, line)

    batches = make_batches(args, device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every occurrence, not once per location
        warnings.showwarning = record
        rate = tlkit_fit(args, batches, device, callbacks=callbacks, **options)
    run_dir.cleanup()

    setting = f"{args.model} {args.image_size}px batch {args.batch_size} {args.precision} on {args.device}"
    setting += " channels_last" * args.channels_last + " compile" * args.compile
    setting += " logger" * args.logger + " progress_bar" * args.progress_bar
    steps = args.steps - args.from_step
    print(f"{setting}: {args.steps} steps, {rate:.1f} img/s over the last {steps}")
    if not cuda:
        print(f"torch.cuda.set_sync_debug_mode needs CUDA: no synchronisations looked for on {args.device}.")
        return
    total = sum(sites.values())
    print(f"{total} synchronising CUDA calls in steps {args.from_step}..{args.steps - 1} ({total / steps:.1f} a step)")
    for (site, line), count in sites.most_common():
        print(f"{count:6d}  {site}\n        synchronised at {line}")
    if args.strict and total:
        sys.exit(1)


if __name__ == "__main__":
    main()
