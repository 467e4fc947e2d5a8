"""Shards: a source written as chunked files with Lightning's ``litdata``, and read back by streaming them.

``tlkit optimize --source folder:<dir> --out <dir>`` writes ``<out>/train`` and ``<out>/val``, each a litdata
dataset whose items are ``{"image": encoded JPEG bytes, "label": int}``, plus ``<out>/tlkit_shards.json`` (class
names, labels of each split in item order, skipped files). ``ImageDataModule(source="litdata:<out>")`` then trains
from them: litdata gives each DDP rank and each loader worker its own chunks, streams them from a remote URI
(``s3://...``, ``gs://...``) when ``<out>`` is one, shuffles per epoch, and its loader's position is saved in
checkpoints for an exact resume. Decoding and transforms are the same as for a folder.

The train split is written in a seeded random order (:func:`train_order`): litdata gives each loader worker a
contiguous run of a chunk's items and a loader batch comes from one worker, so a source listed class by class (a
folder) would give batches of a few classes each; the quickstart recipe trained 4 points lower that way.

Images larger than ``max_side`` are made smaller (decoded at a reduced DCT scale, resized, encoded as JPEG); JPEGs
within it are copied byte for byte (after a decode that proves they can be read); other images are encoded as JPEG.
A file that passed the source's scan but cannot be decoded (damaged inside the data) is left out of the shards and
listed in ``tlkit_shards.json`` with the files the scan left out; training from the shards reports them all.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset
from PIL import Image
from torchvision.transforms import v2

from tlkit.data.decode import MAX_IMAGE_PIXELS, read_image
from tlkit.data.sources import SHARDS_META_FILE, load_source, short_reason
from tlkit.data.splits import SourceData, Split

try:
    import fcntl
except ImportError:  # Windows: no lockf; two runs writing one folder are then not stopped
    fcntl = None

META_FILE = SHARDS_META_FILE
LOCK_FILE = ".tlkit_optimize.lock"
SPLITS = ("train", "val")
# litdata's processes: forked on Linux (see _litdata_contained); elsewhere litdata's choice (spawn on macOS, Windows)
_START_METHOD = "fork" if sys.platform.startswith("linux") else None
SCHEME = "litdata:"


def optimize(
    *,  # options, as the help and docs write them: --source folder:<dir> --out <dir>
    source: str,
    out: str,
    max_side: int | None = 512,
    quality: int = 90,
    val_split: float = 0.2,
    seed: int = 0,
    chunk_bytes: str = "64MB",
    num_workers: int = 1,
    on_bad_image: str = "skip",
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> None:
    """Write an image source as litdata shards, to train from with ``--data.init_args.source litdata:<out>``.

    Shards stream to many machines (each DDP rank reads its own chunks, from a local folder or a bucket), and read
    fast from network file systems where a folder of small files is slow.

    Args:
        source: Any tlkit source: ``folder:<dir>``, ``csv:<file>``, ``textures``, ...
        out: Output folder (or a remote URI litdata can write to); gets ``train/``, ``val/`` and ``tlkit_shards.json``.
        max_side: Images with a longer side are resized to it (JPEG, ``quality``); None keeps every size.
        quality: JPEG quality of re-encoded images.
        val_split: Fraction of each class held out for validation when the source has no val split.
        seed: Seed of that split and of the order the train split is written in.
        chunk_bytes: Size of each chunk file.
        num_workers: Processes that encode images.
        on_bad_image: ``skip`` (unreadable files are left out and listed in ``tlkit_shards.json``) or ``raise``.
        max_image_pixels: Files declaring more pixels are unreadable; None: no limit.
    """
    _check_out_is_outside(source, out)
    data = load_source(
        source, val_split=val_split, seed=seed, on_bad_image=on_bad_image, max_image_pixels=max_image_pixels
    )
    if data.multilabel:  # a shard item holds one integer label
        raise ValueError(
            f"{source} is multi-label (several labels per image); shards hold one label per image. Train from the "
            "source itself (ImageDataModule(source=...)), which streams it from disk."
        )
    train = data.train.take(train_order(len(data.train), seed))
    encoder = functools.partial(_Encoder, max_side=max_side, quality=quality, max_pixels=max_image_pixels)
    with _only_writer(out), _litdata_contained():
        _remove(_join(out, META_FILE))  # written last: a run that stops part-way leaves no shards folder behind
        labels, skipped = {}, list(data.skipped)
        for name, split in zip(SPLITS, (train, data.val), strict=True):
            kept, failed = _write_split(split, _join(out, name), encoder, chunk_bytes, num_workers)
            if failed and on_bad_image == "raise":
                path, reason = failed[0]
                raise ValueError(
                    f"{path}: {reason} ({len(failed)} such file(s) in the {name} split). Remove or replace it, or "
                    "pass --on_bad_image skip to leave such files out (they are then listed in tlkit_shards.json)."
                )
            labels[name], skipped = list(kept.targets), skipped + failed
        meta = {
            "source": source,
            "class_names": data.class_names,
            "labels": labels,
            "skipped": skipped,
            "max_side": max_side,
        }
        _write_text(_join(out, META_FILE), json.dumps(meta))


def _check_out_is_outside(source: str, out: str) -> None:
    """Shards written into a folder source would be listed as one of its classes by the next run."""
    if not source.startswith("folder:") or "://" in out:
        return
    root, target = Path(source.removeprefix("folder:")).expanduser().resolve(), Path(out).expanduser().resolve()
    if target == root or root in target.parents:
        raise ValueError(
            f"--out {out} is inside the source folder {root}: its shards would be read as a class folder of the "
            f"source next time. Write them outside it, e.g. --out {root.parent / (root.name + '_shards')}"
        )


def _write_split(
    split: Split, split_dir: str, encoder: Callable[..., _Encoder], chunk_bytes: str, num_workers: int
) -> tuple[Split, list[tuple[str, str]]]:
    """Write one split as a litdata dataset: the part of the split written, and ``(path, reason)`` of the files
    left out (unreadable)."""
    import litdata

    # Local even when the output is a bucket: litdata's encoding processes run on this machine.
    with tempfile.TemporaryDirectory(prefix="tlkit-optimize-") as failures:
        litdata.optimize(
            fn=encoder(split, failures=failures),
            inputs=list(range(len(split))),  # positions, not paths: litdata would treat paths as files to fetch
            output_dir=split_dir,
            chunk_bytes=chunk_bytes,
            num_workers=num_workers,
            start_method=_START_METHOD,
            mode="overwrite",
            keep_data_ordered=True,  # items in input order: the labels in tlkit_shards.json line up with them
            reorder_files=False,
            verbose=False,
        )
        failed = _read_failures(failures)
    kept = split.take([i for i in range(len(split)) if i not in failed]) if failed else split
    _check_written(split_dir, len(kept))
    return kept, [failed[i] for i in sorted(failed)]


@contextlib.contextmanager
def _only_writer(out: str) -> Iterator[None]:
    """Refuse to write where another ``optimize`` is writing: two runs overwrite each other's chunks and index files
    (one of them then ended "successfully" with an empty split). A lock file in a local ``out``; none for a bucket."""
    if "://" in out or fcntl is None:
        yield
        return
    Path(out).expanduser().mkdir(parents=True, exist_ok=True)
    with open(Path(out).expanduser() / LOCK_FILE, "a") as lock:
        try:  # a POSIX lock (lockf), not flock: litdata's forked processes do not inherit it, and so cannot keep
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # holding it after this process is interrupted
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RuntimeError(
                f"Another `tlkit optimize` is writing {out}; wait for it to finish, or write to another --out"
            ) from None
        yield  # the lock goes when the file closes


@contextlib.contextmanager
def _litdata_contained() -> Iterator[None]:
    """Run litdata's ``optimize`` without the changes it makes to the whole process.

    - litdata sets the process's multiprocessing start method (``set_start_method(..., force=True)``) to ``spawn``:
      every process it starts re-imported torch and tlkit (~15 s of a small ``optimize``), code piped to ``python -``
      could not start them at all, and the caller's DataLoader workers were spawned too from then on. On Linux its
      processes are forked here, as PyTorch's DataLoader workers are; the caller's start method comes back after.
    - Its SIGINT handler stops its workers and calls ``os._exit(0)``: ``tlkit optimize ... && tlkit fit ...`` went on
      after a Ctrl-C, and the handler stayed installed after ``optimize`` returned, so a later Ctrl-C (in training,
      in a notebook) ended the process with status 0 and no ``KeyboardInterrupt``. Here Ctrl-C ends it with 130, as
      an interrupted command does, and the caller's handler comes back after.
    """
    from litdata.processing.data_processor import DataProcessor

    def stop_and_fail(processor: DataProcessor, signum: int, frame: Any) -> None:
        for queue in getattr(processor, "stop_queues", None) or []:  # litdata's own handler does this, then exit 0
            queue.put(None)
        for worker in getattr(processor, "workers", None) or []:
            worker.join(0)
        os._exit(128 + signal.SIGINT)

    start_method = multiprocessing.get_start_method(allow_none=True)
    previous = signal.getsignal(signal.SIGINT)
    original, DataProcessor._signal_handler = DataProcessor._signal_handler, stop_and_fail
    try:
        yield
    finally:
        DataProcessor._signal_handler = original
        multiprocessing.set_start_method(start_method, force=True)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)  # (None: a handler not set from Python, which stays)


def train_order(count: int, seed: int) -> np.ndarray:
    """The order ``optimize`` writes a train split of ``count`` images in: a permutation fixed by ``seed``."""
    return np.random.default_rng([seed, count]).permutation(count)


class _Encoder:
    """``position -> {"image": JPEG bytes, "label": label}`` of one split; picklable for litdata's worker processes.

    A generator, which litdata lets yield no item: a file that cannot be decoded yields none, and its path and reason
    go to ``failures`` (a folder, one JSON file per position) for :func:`optimize` to list (or raise).
    """

    def __init__(self, split: Split, max_side: int | None, quality: int, max_pixels: int | None, failures: str) -> None:
        self.split, self.max_side, self.quality, self.max_pixels = split, max_side, quality, max_pixels
        self.failures = failures

    def __call__(self, position: int) -> Iterator[dict[str, Any]]:
        sample, label = self.split.samples[position], self.split.targets[position]
        try:
            encoded = self._encode(sample)
        except (ValueError, OSError) as err:
            if not isinstance(sample, str):  # an array from a built-in dataset: a bug, not a damaged file
                raise
            reason = (
                f"unreadable when encoded (damaged inside the data, which the scan does not read): {short_reason(err)}"
            )
            (Path(self.failures) / f"{position}.json").write_text(json.dumps([sample, reason]))
            return
        yield {"image": encoded, "label": int(label)}

    def _encode(self, sample: Any) -> bytes:
        if isinstance(sample, str) and self._keep_as_is(sample):
            data = Path(sample).read_bytes()
            read_image(data, self.max_pixels)  # the scan read its header and end marker; this reads its data
            return data
        image = read_image(sample, self.max_pixels, min_size=self._min_size)
        if self.max_side is not None and max(image.shape[-2:]) > self.max_side:
            image = v2.functional.resize(image, None, max_size=self.max_side, antialias=True)
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=self.quality)
        return buffer.getvalue()

    def _keep_as_is(self, path: str) -> bool:
        with Image.open(path) as img:
            small = self.max_side is None or max(img.size) <= self.max_side
            return img.format == "JPEG" and img.mode in ("RGB", "L") and small

    def _min_size(self, height: int, width: int) -> tuple[int, int]:
        if self.max_side is None:
            return height, width
        scale = min(1.0, self.max_side / max(height, width))
        return round(height * scale), round(width * scale)


def _read_failures(folder: str) -> dict[int, tuple[str, str]]:
    """``position -> (path, reason)`` of the files the encoders could not read."""
    return {int(f.stem): tuple(json.loads(f.read_text())) for f in Path(folder).glob("*.json")}


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if "://" in base else str(Path(base).expanduser() / name)


def _write_text(uri: str, text: str) -> None:
    if "://" in uri:
        import fsspec

        with fsspec.open(uri, "w") as f:
            f.write(text)
        return
    tmp = f"{uri}.{os.getpid()}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, uri)


def _remove(uri: str) -> None:
    if "://" in uri:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            fs.rm(path)
        return
    Path(uri).unlink(missing_ok=True)


def _read_json(uri: str) -> Any:
    if "://" in uri:
        import fsspec

        with fsspec.open(uri, "r") as f:
            return json.load(f)
    return json.loads(Path(uri).read_text())


def _check_written(split_dir: str, expected: int) -> None:
    """Count the items litdata wrote: ``litdata.optimize`` returns normally having written none when its worker
    processes fail to start (spawned, on macOS and Windows, they re-import the main module, which code piped to
    ``python -`` does not have as a file), and training then stopped at "No chunks found"."""
    if expected == 0:
        return
    written = _count_items(split_dir)
    if written != expected:
        raise RuntimeError(
            f"litdata wrote {written} of {expected} images to {split_dir}: its worker processes failed. Run "
            "`tlkit optimize --source ... --out ...` from a shell, or call optimize() in a script under "
            "`if __name__ == '__main__':`, not from code piped to python (spawned workers re-import the main module)."
        )


def _count_items(split_dir: str) -> int:
    """The number of items litdata's ``index.json`` lists in a split folder."""
    index = _read_json(_join(split_dir, "index.json"))
    return sum(chunk.get("chunk_size", 0) for chunk in index.get("chunks") or [])


def read_meta(uri: str) -> dict[str, Any]:
    """The ``tlkit_shards.json`` of a shards folder (local, or remote through fsspec)."""
    path = _join(uri, META_FILE)
    try:
        return _read_json(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{path} not found: 'litdata:{uri}' must name a folder written by `tlkit optimize --source ... --out "
            f"{uri}` (which writes it last: without it, optimize did not finish there; run it again)"
        ) from err


def shard_source_data(uri: str) -> SourceData:
    """The splits of a shards folder as tlkit sees them: labels and class names from its metadata; the samples are
    the items' positions (the images stay in the shards until a loader streams them)."""
    meta = read_meta(uri)
    for name in SPLITS:  # the metadata and the chunks must be of one run: a label per item, in item order
        listed = len(meta["labels"][name])
        if listed and (written := _count_items(_join(uri, name))) != listed:
            raise ValueError(
                f"{_join(uri, name)} holds {written} images but {_join(uri, META_FILE)} labels {listed}: the two are "
                f"not from one `tlkit optimize` run. Write the shards again (tlkit optimize ... --out {uri})."
            )
    splits = [Split(samples=range(len(meta["labels"][name])), targets=meta["labels"][name]) for name in SPLITS]
    skipped = [tuple(row) for row in meta.get("skipped", [])]
    return SourceData(*splits, class_names=meta["class_names"], skipped=skipped)


class ShardDataset(StreamingDataset):
    """A litdata ``StreamingDataset`` of tlkit shards that yields ``(uint8 image after transform, label)``.

    Args:
        input_dir: One split of a shards folder (``<out>/train``), local or remote.
        transform: uint8 -> uint8 transform after decoding.
        decode: ``encoded bytes -> uint8 (3, H, W)``; default :func:`tlkit.data.decode.read_image`.
        **kwargs: ``StreamingDataset``'s (``shuffle``, ``seed``, ``drop_last``, ...).
    """

    def __init__(
        self,
        input_dir: str,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        decode: Callable[[bytes], torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(input_dir, **kwargs)
        self.image_transform, self.decode = transform, decode or read_image

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, int]:
        item = super().__getitem__(index)
        image = self.decode(bytes(item["image"]))
        if self.image_transform is not None:
            image = self.image_transform(image)
        return image, int(item["label"])


def split_dir(uri: str, split: str) -> str:
    return _join(uri, split)
