"""Where a run lives, and reading a W&B run back: the run's own directory, and the metrics and config of an
(offline) W&B run from its ``.wandb`` transaction log, without a network.

- :func:`run_directory`, :func:`run_directory_on_every_rank`: the folder of this run (next to its ``checkpoints/``).
- :func:`read_wandb_history`, :func:`read_wandb_config`: what a W&B run logged, read from its ``.wandb`` file.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_directory(trainer: L.Trainer) -> str:
    """The folder that belongs to this run: the first logger's ``save_dir/name/version`` (where ``ModelCheckpoint``
    puts ``checkpoints/``; for W&B ``save_dir/<project>/<run id>``), or ``default_root_dir`` without a logger.

    Lightning's ``trainer.log_dir`` is the shared ``save_dir`` for loggers other than CSV and TensorBoard. Call it on
    global rank 0 (it may create the W&B run).
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    if isinstance(logger, CSVLogger | TensorBoardLogger):
        return logger.log_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


def run_directory_on_every_rank(trainer: L.Trainer) -> str:
    """Global rank 0's :func:`run_directory`, broadcast: call it on every rank (a collective under DDP, or rank 0
    waits forever)."""
    return trainer.strategy.broadcast(run_directory(trainer) if trainer.is_global_zero else None)


def read_wandb_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The logged metrics of a W&B run, one dict per ``wandb.log`` call, read from the run's ``.wandb`` file.

    Media come back as the dicts W&B stores (``{"_type": "images/separated", "filenames": [...]}``). The file is
    W&B's transaction log (what ``wandb sync`` uploads): a LevelDB-style log of
    ``wandb.proto.wandb_internal_pb2.Record`` messages. Works for offline runs without a network.

    Args:
        run_dir: the run folder (``.../wandb/offline-run-<time>-<id>``) or its ``.wandb`` file.
    """
    history = []
    for record in _wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_nested(row, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
            history.append(row)
    return history


def read_wandb_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The config of a W&B run (what ``run.config`` holds, without W&B's own ``_wandb`` entry), read back from its
    ``.wandb`` file like :func:`read_wandb_history`."""
    config: dict[str, Any] = {}
    for record in _wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        items = record.config.update if kind == "config" else record.run.config.update if kind == "run" else []
        for item in items:
            _set_nested(config, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
    config.pop("_wandb", None)
    return config


def _wandb_records(run_dir: str | os.PathLike) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    for payload in _wandb_log_records(_wandb_file(Path(run_dir))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _set_nested(row: dict[str, Any], keys: list[str], value: Any) -> None:
    # Media are logged as nested items: ["val/confusion_matrix", "_type"] -> row["val/confusion_matrix"]["_type"]
    for key in keys[:-1]:
        row = row.setdefault(key, {})
    row[keys[-1]] = value


def _wandb_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(path.glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"No .wandb file in {str(path)!r}; pass a run folder like wandb/offline-run-*.")
    return files[0]


_BLOCK, _HEADER = 32768, 7  # LevelDB log block size and record header (crc32 u32, length u16, type u8)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_log_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER].ljust(_HEADER, b"\0"))
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{str(path)!r} is not a W&B transaction log (header {data[:_HEADER]!r}).")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer too small for a header: zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if kind == 0 or len(chunk) < length:  # preallocated zeros, or a run that is still being written
            break
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"Corrupt record at byte {pos} of {str(path)!r} (checksum mismatch).")
        pos += _HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            yield pending


__all__ = ["read_wandb_config", "read_wandb_history", "run_directory", "run_directory_on_every_rank"]
