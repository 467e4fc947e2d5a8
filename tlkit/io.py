"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never a part of one.

Lightning and fsspec write a checkpoint to ``TMPDIR`` and move it into place; when ``TMPDIR`` is on another file
system the move is a copy, and a kill during the copy leaves a truncated file where the good one was. Here the new
content is written in the destination's own folder, flushed to disk (``fsync``), and ``os.replace`` swaps it in
(atomic on one file system); the folder is then synced so the rename itself survives a power cut.

On Linux the content goes to an unnamed file (``O_TMPFILE``) that gets a name only once it is complete, so a writer
killed mid-write leaves nothing behind: the kernel frees the unnamed file (a kill in the microseconds between naming
the complete file and renaming it onto the destination leaves that temporary name). Elsewhere (and for writers that
need a path) it is a named temporary file ``.<name>.<pid>.<random>.tmp``. The next write of the same file removes the
temporaries of writers that are gone.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tlkit.secrets import scrub_secrets, secret_values

_TMP_SUFFIX = ".tmp"
# Text files that list image paths (predictions, skipped files, error analysis): a file name that is not UTF-8 (the
# Latin-1 names of an old Windows zip, which Python holds as surrogates) is written back as the bytes it is, so the
# path in the file still opens the image; strict UTF-8 raised "surrogates not allowed" and lost the whole file.
PATH_TEXT: dict[str, str] = {"encoding": "utf-8", "errors": "surrogateescape"}


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[Any]:
    """``open(path, mode)`` for writing a whole file, atomically: ``path`` changes only when the block succeeds.

    Args:
        path: the file to write (its folder is created).
        mode: ``"wb"`` or ``"w"`` (with ``open``'s other arguments, e.g. ``newline=""``).

    Example:
        >>> with atomic_open("out/predictions.csv", "w", newline="") as f:  # doctest: +SKIP
        ...     f.write("path,prediction\\n")
    """
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes a whole file (mode 'w' or 'wb'), not mode {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _unnamed_file(path.parent)
    if fd is None:
        with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
            yield f
        return
    with open(fd, mode, **kwargs) as f:  # an exception closes it, and the kernel frees the unnamed file
        yield f
        f.flush()
        os.fsync(f.fileno())
        _link_into_place(f.fileno(), path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to ``path`` for writers that need a path (safetensors, ONNX, TorchScript); on success
    it replaces ``path`` atomically, on an exception it is removed and ``path`` is left as it was.

    A writer killed while writing leaves its temporary file (``.<name>.<pid>.<random>.tmp``); the next write of
    ``path`` removes it (:func:`remove_stale_temporaries`). Prefer :func:`atomic_open`, which leaves nothing.

    Example:
        >>> with atomic_path("out/feats.safetensors") as tmp:  # doctest: +SKIP
        ...     save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _new_temporary(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Removes the temporary files of ``path`` whose writing process no longer runs; returns them.

    Another live process's temporary file is kept: it may be writing right now.
    """
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{_TMP_SUFFIX}"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _unnamed_file(folder: Path) -> int | None:
    """A file descriptor of a new unnamed file in ``folder`` (Linux ``O_TMPFILE``), or None where there is none."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)  # 0o666 less the umask, as open() gives
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):  # the file system (or kernel) lacks it
            return None
        raise


def _link_into_place(fd: int, path: Path) -> None:
    """Gives the complete unnamed file ``fd`` a temporary name, renames that onto ``path``, and syncs the folder."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_stale_temporaries(path)  # of writers killed between this link and the rename
        while True:
            name = _temporary_name(path)
            try:
                # With dst_dir_fd Python calls linkat(AT_SYMLINK_FOLLOW): /proc's link leads to the open file.
                os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=folder)
                break
            except FileExistsError:
                continue
        os.replace(name, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        os.fsync(folder)
    finally:
        os.close(folder)


def _temporary_name(path: Path) -> str:
    # The pid tells remove_stale_temporaries whether the writer still runs.
    return f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"


def _new_temporary(path: Path) -> Path:
    while True:
        tmp = path.with_name(_temporary_name(path))
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # usual permissions, unlike mkstemp
            return tmp
        except FileExistsError:
            continue


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

    A checkpoint is written in its own folder and swapped in (:func:`atomic_open`), so a kill at any moment leaves
    the previous complete ``last.ckpt``, never a truncated one, and on Linux no temporary file. Its non-tensor
    entries (``hyper_parameters``, ``datamodule_hyper_parameters``, callback states) are scrubbed of secrets
    (:func:`tlkit.secrets.scrub_secrets`). Remote paths (``s3://``...) are left to Lightning. The ``tlkit`` command
    installs it; from Python pass it to the Trainer.

    Example:
        >>> trainer = L.Trainer(plugins=[AtomicCheckpointIO()])  # doctest: +SKIP
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_open(path) as f:
            torch.save(scrub_checkpoint(checkpoint), f)


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
