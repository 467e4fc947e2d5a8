"""Training throughput of `tlkit fit` against a plain PyTorch loop: same model, data, batch size and precision.

Both loops consume the same uint8 batches, already on the device, so the ratio measures what tlkit and Lightning
add per step (normalisation on the device, metrics, logging, hooks), not data loading.

    python benchmarks/overhead.py                                   # CPU: resnet18, 64 px, batch 32
    python benchmarks/overhead.py --device cuda --model resnet50 --image-size 224 --batch-size 256 \
        --precision bf16-mixed --channels-last [--compile]          # the GPU setting of issue 2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time

import lightning as L
import timm
import torch
import torch.nn.functional as F

from tlkit import ImageDataModule, TransferClassifier


class DeviceBatches:
    """The same pre-made batches, re-iterated: what a data module of data already on the device yields."""

    def __init__(self, batches: list, steps: int):
        self.batches, self.steps = batches, steps

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))

    def __len__(self) -> int:
        return self.steps


class OnDeviceData(ImageDataModule):
    """tlkit's data module (normalisation on the device included), fed from batches already on the device."""

    def __init__(self, batches: list, steps: int, data_config: dict):
        super().__init__(source="digits", preprocess="pretrained", data_config=data_config)
        self.device_batches = DeviceBatches(batches, steps)

    def train_dataloader(self):
        self.setup()
        return self.device_batches


def make_batches(args, device) -> list:
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=g) for _ in range(4)]
    labels = [torch.randint(0, args.num_classes, (args.batch_size,), generator=g) for _ in range(4)]
    return [(x.to(device), y.to(device)) for x, y in zip(images, labels, strict=True)]


def plain_loop(args, batches, device) -> float:
    """img/s of a hand-written loop: normalise, forward, cross-entropy, backward, SGD step, cosine LR step."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    mean = torch.tensor(model.pretrained_cfg["mean"] if hasattr(model, "pretrained_cfg") else (0.5,) * 3)
    std = torch.tensor(model.pretrained_cfg["std"] if hasattr(model, "pretrained_cfg") else (0.5,) * 3)
    mean, std = mean.view(1, 3, 1, 1).to(device), std.view(1, 3, 1, 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / args.steps)))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if args.precision == "bf16-mixed"
        else contextlib.nullcontext()
    )
    model.train()
    start = None
    for step, (images, targets) in enumerate(DeviceBatches(batches, args.steps)):
        if step == args.warmup:
            _sync(device)
            start = time.perf_counter()
        x = (images.float() / 255 - mean) / std
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    _sync(device)
    return (args.steps - args.warmup) * args.batch_size / (time.perf_counter() - start)


class Stopwatch(L.Callback):
    def __init__(self, warmup: int, device):
        self.warmup, self.device, self.start, self.end = warmup, device, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        _sync(self.device)
        self.end = time.perf_counter()


def tlkit_fit(args, batches, device, callbacks=(), **trainer_options) -> float:
    """img/s of `Trainer.fit` on a TransferClassifier with the same model, optimiser and schedule (``callbacks`` and
    ``trainer_options`` are for benchmarks/gpu_syncs.py, which runs this same setup)."""
    torch.manual_seed(0)
    model = TransferClassifier(
        args.model, num_classes=args.num_classes, optimizer="sgd", lr=0.01, schedule="cosine",
        channels_last=args.channels_last, compile=args.compile,
    )  # fmt: skip
    data = OnDeviceData(batches, args.steps, model.data_config)
    watch = Stopwatch(args.warmup, device)
    options = dict(
        max_steps=args.steps, max_epochs=1, accelerator=device.type, devices=1, precision=args.precision,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[watch, *callbacks],
    )  # fmt: skip
    trainer = L.Trainer(**{**options, **trainer_options})
    trainer.fit(model, data)
    return (args.steps - args.warmup) * args.batch_size / (watch.end - watch.start)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The training setting (model, device, sizes, precision, memory format, compile), shared with gpu_syncs.py."""
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting_arguments(parser)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = make_batches(args, device)
    plain, tlkit = [], []
    for _ in range(args.rounds):  # alternate, so drift in machine load hits both alike
        plain.append(plain_loop(args, batches, device))
        tlkit.append(tlkit_fit(args, batches, device))
    p, t = statistics.median(plain), statistics.median(tlkit)
    setting = f"{args.model} {args.image_size}px batch {args.batch_size} {args.precision} on {args.device}"
    setting += " channels_last" * args.channels_last + " compile" * args.compile
    print(f"{setting}\nplain PyTorch loop: {p:8.1f} img/s  (rounds: {', '.join(f'{v:.1f}' for v in plain)})")
    print(f"tlkit fit:          {t:8.1f} img/s  (rounds: {', '.join(f'{v:.1f}' for v in tlkit)})")
    print(f"ratio tlkit/plain:  {t / p:.3f}")


if __name__ == "__main__":
    main()
