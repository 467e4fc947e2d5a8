"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a part of one.

Lightning and fsspec write a checkpoint to ``TMPDIR`` and move it into place; when ``TMPDIR`` is on another file
system the move is a copy, and a kill during the copy leaves a truncated file where the good one was. Here the
temporary file lives in the destination's own folder, is flushed to disk (``fsync``), and ``os.replace`` swaps it
in (atomic on one file system); the folder is then synced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tlkit.secrets import scrub_secrets, secret_values

_TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was. Temporary files left behind by a
    writer that was killed (``.<name>.<pid>.<random>.tmp`` whose process is gone) are removed on the next write.

    Example:
        >>> with atomic_path("out/feats.safetensors") as tmp:  # doctest: +SKIP
        ...     save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator:
    """``open(path, mode)`` for writing, made atomic with :func:`atomic_path`.

    Example:
        >>> with atomic_open("out/predictions.csv", "w", newline="") as f:  # doctest: +SKIP
        ...     f.write("path,prediction\\n")
    """
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Removes the temporary files of ``path`` whose writing process no longer runs; returns them.

    Another live process's temporary file is kept: it may be writing right now.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process's own earlier temporaries are removed by its except clause, or are in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform (Windows) or file system can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def claim_version(root: str | os.PathLike) -> int:
    """Creates the next free ``<root>/version_<n>`` folder and returns ``n``; the folder belongs to this caller.

    ``os.mkdir`` fails when the folder exists, so two runs started together never get the same one: the loser
    tries the next number (Lightning's loggers list the folders and pick the next number, which two runs can share).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(d.name[8:]) for d in root.glob("version_*") if d.name[8:].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{version}")
            return version
        except FileExistsError:
            version += 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes checkpoints atomically wherever ``TMPDIR`` is, without secrets.

    A checkpoint is written to a temporary file in its own folder and swapped in (:func:`atomic_path`), so a kill at
    any moment leaves the previous complete ``last.ckpt``, never a truncated one, and the next save removes the dead
    writer's temporary file. Its non-tensor entries (``hyper_parameters``, ``datamodule_hyper_parameters``, callback
    states) are scrubbed of secrets (:func:`tlkit.secrets.scrub_secrets`). Remote paths (``s3://``...) are left to
    Lightning. The ``tlkit`` command installs it; from Python pass it to the Trainer.

    Example:
        >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()])  # doctest: +SKIP
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as tmp:
            torch.save(scrub_checkpoint(checkpoint), tmp)


def _is_local(path: Any) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


def scrub_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of a checkpoint with its non-tensor entries scrubbed of secrets (weights are left alone)."""
    weights = ("state_dict", "optimizer_states", "lr_schedulers")
    secrets = secret_values()
    return {key: value if key in weights else scrub_secrets(value, secrets) for key, value in checkpoint.items()}


__all__ = [
    "AtomicCheckpointIO",
    "claim_version",
    "atomic_open",
    "atomic_path",
    "remove_stale_temporaries",
    "scrub_checkpoint",
]
