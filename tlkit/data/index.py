"""A cached index of image files: which files of a source are usable, judged from their headers, kept on disk.

Checking a file from its header costs a small fraction of decoding it (a 6-MP JPEG: a header and its last bytes,
not 6 million pixels). A JPEG whose header opens, whose size is within the pixel limit and whose end-of-image marker
is in place is usable; so is a PNG whose chunks all have matching CRCs, ``IEND`` last. Any other format, and a JPEG
or PNG that fails these (truncated, or with trailing data some cameras add), is decoded in full to decide. A file
that passes but still fails to decode is caught by the loader (:class:`tlkit.data.sources.ImageDataset`), which
replaces it and lists it in ``skipped_files.csv``.

The verdicts are stored in ``<cache dir>/index/<key>.npz``, keyed by path, size, modification and change time: a new
file, or one whose size, mtime or ctime changed (``chmod`` changes the ctime), is checked again. A second run over a
folder lists it and ``stat``s only the files not known to be usable (new ones, unusable ones that may have been
mended, symbolic links, whose target may have gone): a usable file changed in place since is decoded in full by the
loader anyway, which catches it as it catches a file damaged inside. Listing is what ``ImageFolder`` does; one
``stat`` per file on top of it was most of a second run (100,000 small JPEGs: 0.31 of 0.50 s). Files named by a CSV
are all ``stat``ed: no listing vouches that they are still there. Processes that share the cache dir (the ranks of
one node under DDP) take turns through a file lock: the first builds the index, the others wait and then find it up
to date.

Paths are held in a :class:`PathList` (one byte array and offsets), not one Python string per file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlkit.data.decode import open_within_limit

try:
    import fcntl
except ImportError:  # Windows: no flock; processes then may build the same index at the same time
    fcntl = None

INDEX_VERSION = 3  # 2: NUL-terminated paths; 3: ctimes
_JPEG_END = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cache_dir() -> Path:
    """tlkit's cache folder: ``$TLKIT_CACHE_DIR``, else ``~/.cache/tlkit``."""
    return Path(os.environ.get("TLKIT_CACHE_DIR") or Path.home() / ".cache" / "tlkit").expanduser()


class PathList(Sequence[str]):
    """An immutable list of paths stored as one byte array (NUL-terminated paths) plus offsets.

    A Python ``str`` per file costs ~100 bytes and a reference count that every loader worker (a forked copy of the
    process) writes to when it reads the path, copying the page: a million paths as strings become a copy per
    worker. Here the paths are two numpy arrays, read without touching any per-path object.
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob, self.offsets = blob, offsets

    @classmethod
    def from_strings(cls, paths: Iterable[str]) -> PathList:
        paths = list(paths)
        if not paths:
            return cls(np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64))
        # One encode of all paths, NUL-separated (no path contains NUL): the separators give the offsets.
        blob = np.frombuffer(os.fsencode("\x00".join(paths) + "\x00"), dtype=np.uint8)
        ends = np.flatnonzero(blob == 0)
        offsets = np.concatenate([[0], ends + 1]).astype(np.int64)  # path i: blob[offsets[i] : offsets[i+1] - 1]
        return cls(blob, offsets)

    @classmethod
    def concat(cls, lists: Sequence[PathList]) -> PathList:
        blobs = [p.blob for p in lists]
        starts = np.cumsum([0, *(len(b) for b in blobs)])
        offsets = [lists[0].offsets[:1], *(p.offsets[1:] + start for p, start in zip(lists, starts, strict=False))]
        return cls(np.concatenate(blobs) if blobs else np.zeros(0, np.uint8), np.concatenate(offsets))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # int -> str; slice -> PathList
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"PathList index {index} out of range ({len(self)} paths)")
        return os.fsdecode(self.blob[self.offsets[index] : self.offsets[index + 1] - 1].tobytes())

    def __iter__(self) -> Iterator[str]:
        if len(self) == 0:
            return iter(())
        return iter(os.fsdecode(self.blob[:-1].tobytes()).split("\x00"))

    def take(self, indices: Iterable[int]) -> PathList:
        """The paths at ``indices``, as a new PathList (gathered as arrays, no string per path)."""
        indices = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices, dtype=np.int64)
        starts, lengths = self.offsets[indices], np.diff(self.offsets)[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return PathList(self.blob[gather], offsets)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PathList):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.blob, other.blob)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    def __add__(self, other: Sequence[str]) -> list[str]:
        return [*self, *other]

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths)"


def header_problem(path: str, max_pixels: int | None, full_check: Callable[[str], str | None]) -> str | None:
    """Why ``path`` is not a usable image (None: usable), from its structure where that suffices, else from
    ``full_check`` (a full decode).

    A JPEG is usable when its header (and EXIF block) parses and it ends with its end-of-image marker; a PNG when
    every chunk's CRC matches and it ends with ``IEND`` (a CRC over the bytes costs a fraction of inflating and
    unfiltering them, and catches the damaged chunks that made libpng abort, issue 8).
    """
    try:
        with open(path, "rb") as file, open_within_limit(path, file, max_pixels) as img:
            if min(img.size) > 0 and img.format == "JPEG":
                img.getexif()  # the APP1 block, in the header: a damaged one raises as it would when loaded
                file.seek(max(0, os.fstat(file.fileno()).st_size - len(_JPEG_END)))
                intact = file.read() == _JPEG_END
            elif min(img.size) > 0 and img.format == "PNG":  # (PIL's getexif would decode a PNG in full)
                file.seek(0)
                intact = _png_chunks_intact(file.read())
            else:
                intact = False
    except Exception:  # noqa: BLE001 - any doubt goes to the full decode, which says what is wrong
        return full_check(path)
    return None if intact else full_check(path)


def _png_chunks_intact(data: bytes) -> bool:
    """Every chunk whole with a matching CRC, ``IEND`` last, nothing after it."""
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(data[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return False
        if data[pos + 4 : pos + 8] == b"IEND":
            return end == len(data)
        pos = end
    return False


@dataclass
class IndexReport:
    """What :func:`check_files` did: ``(path, reason)`` of the unusable files, and how many files it checked (the
    rest were up to date in the cache)."""

    bad: list[tuple[str, str]]
    checked: int
    cache_file: Path | None


def check_files(
    paths: Sequence[str],
    *,
    key: str,
    full_check: Callable[[str], str | None],
    max_pixels: int | None,
    workers: int | None = None,
    index_dir: str | os.PathLike | None = None,
    listed: bool = False,
    links: Collection[str] = (),
) -> IndexReport:
    """Check ``paths`` from their headers, reusing the verdicts cached for files whose size, mtime and ctime are
    unchanged.

    Args:
        paths: Image file paths.
        key: What the index is of (a folder, a CSV file): one cache file per key and pixel limit.
        full_check: ``path -> reason or None`` by a full decode, for files the header cannot vouch for.
        max_pixels: Pixel limit (files over it are unusable).
        workers: Threads of the header check; default ``min(32, cpu count)``.
        index_dir: Folder of the cache files; default ``cache_dir() / "index"``. The empty string: no cache.
        listed: The paths were just found by listing folders (so they exist): a file cached as usable keeps its
            verdict without a ``stat`` (the loader decodes it in full anyway, see the module docstring).
        links: The listed paths that are symbolic links: ``stat``ed all the same, since a link's target may be gone
            while the listing still shows the link.
    """
    paths = paths if isinstance(paths, PathList) else PathList.from_strings(paths)
    cache_file = _cache_file(key, max_pixels, index_dir)
    with _locked(cache_file):
        cached = _load(cache_file)
        # The usual case, an unchanged listing: compared as arrays, each path then at its own row.
        same_listing = cached is not None and PathList(cached["blob"], cached["offsets"]) == paths
        rows = np.arange(len(paths)) if same_listing else _cached_rows(cached, paths)
        trusted = np.zeros(len(paths), dtype=bool)
        if listed and cached is not None:
            trusted[rows >= 0] = cached["codes"][rows[rows >= 0]] == _GOOD
            if links:
                trusted &= np.array([path not in links for path in paths], dtype=bool)
        stats = _stat_all(paths, skip=trusted)
        if trusted.any():  # their size and times as cached: the cache then stays as it was for them
            for name, values in stats.items():
                values[trusted] = cached[name][rows[trusted]]
        reasons = _reuse(cached, rows, stats)
        todo = np.flatnonzero(reasons.codes == _UNKNOWN)
        if len(todo):
            found = _check_headers([paths[i] for i in todo], max_pixels, full_check, workers)
            reasons = _merge(reasons, todo, found)
        if len(todo) or (cached is not None and not same_listing):
            _save(cache_file, paths, stats, reasons)
    bad = [(paths[i], reasons.table[reasons.codes[i]]) for i in np.flatnonzero(reasons.codes >= 0).tolist()]
    return IndexReport(bad, checked=len(todo), cache_file=cache_file)


# ------------------------------------------------------------------------------------------------ verdicts

_UNKNOWN, _GOOD = -2, -1  # codes >= 0 index into the table of reasons


@dataclass
class _Reasons:
    codes: np.ndarray  # int32 per file
    table: list[str]


def _cached_rows(cached: dict | None, paths: PathList) -> np.ndarray:
    """Each path's row in a cache whose listing differs (-1: not in it)."""
    if cached is None:
        return np.full(len(paths), -1, dtype=np.int64)
    where = {p: i for i, p in enumerate(PathList(cached["blob"], cached["offsets"]))}
    return np.array([where.get(p, -1) for p in paths], dtype=np.int64)


def _reuse(cached: dict | None, rows: np.ndarray, stats: dict[str, np.ndarray]) -> _Reasons:
    """Cached verdicts of files whose size, mtime and ctime match; ``_UNKNOWN`` for the rest (and missing files).

    The ctime too: ``chmod`` changes neither size nor mtime, and a file unreadable for its permissions stayed
    unusable after ``chmod a+r`` mended it; ``touch -r`` can put an mtime back, not a ctime."""
    codes = np.full(len(rows), _UNKNOWN, dtype=np.int32)
    if cached is None:
        return _Reasons(codes, [])
    known = rows >= 0
    same = known.copy()
    for name, values in stats.items():
        same[known] &= cached[name][rows[known]] == values[known]
    same &= stats["sizes"] >= 0  # a missing file is checked every time (its reason names what is missing)
    codes[same] = cached["codes"][rows[same]]
    return _Reasons(codes, list(cached["table"]))


def _merge(reasons: _Reasons, todo: np.ndarray, found: list[str | None]) -> _Reasons:
    table = list(reasons.table)
    slot = {reason: i for i, reason in enumerate(table)}
    codes = reasons.codes.copy()
    for row, reason in zip(todo.tolist(), found, strict=True):
        if reason is None:
            codes[row] = _GOOD
        else:
            codes[row] = slot.setdefault(reason, len(table))
            if codes[row] == len(table):
                table.append(reason)
    return _Reasons(codes, table)


def _check_headers(
    paths: list[str], max_pixels: int | None, full_check: Callable[[str], str | None], workers: int | None
) -> list[str | None]:
    # Threads overlap the reads; PIL's parsing holds the GIL.
    return thread_map(lambda path: header_problem(path, max_pixels, full_check), paths, workers)


def thread_map(function: Callable[[str], str | None], paths: Sequence[str], workers: int | None) -> list[str | None]:
    """``[function(path) for path in paths]`` in ``workers`` threads (default ``min(32, cpu count)``), in order.

    The threads take chunks of paths, not a task per path: ``ThreadPoolExecutor.map`` ignores its ``chunksize`` and
    holds a future for every task at once (about 1 kB each: 100,000 files took 200 MB)."""
    workers = workers or min(32, os.cpu_count() or 1)
    size = min(256, max(1, len(paths) // (workers * 8)))
    chunks = [paths[start : start + size] for start in range(0, len(paths), size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [result for found in pool.map(lambda chunk: [function(p) for p in chunk], chunks) for result in found]


def _stat_all(paths: PathList, skip: np.ndarray) -> dict[str, np.ndarray]:
    """``sizes``, ``mtimes`` and ``ctimes`` (ns) of every path but those ``skip`` marks; -1 where the file (or a
    symlink's target) is missing or skipped."""
    stats = {name: np.full(len(paths), -1, dtype=np.int64) for name in ("sizes", "mtimes", "ctimes")}
    sizes, mtimes, ctimes = stats.values()
    if skip.all():
        return stats
    todo = np.flatnonzero(~skip)
    for i, path in zip(todo.tolist(), paths.take(todo) if len(todo) < len(paths) else paths, strict=True):
        try:
            st = os.stat(path)
        except OSError:
            continue
        sizes[i], mtimes[i], ctimes[i] = st.st_size, st.st_mtime_ns, st.st_ctime_ns
    return stats


# ------------------------------------------------------------------------------------------------ the cache file


def _cache_file(key: str, max_pixels: int | None, index_dir: str | os.PathLike | None) -> Path | None:
    if index_dir == "":
        return None
    folder = Path(index_dir).expanduser() if index_dir is not None else cache_dir() / "index"
    digest = hashlib.sha256(f"{INDEX_VERSION}|{key}|{max_pixels}".encode()).hexdigest()[:24]
    return folder / f"{digest}.npz"


class _locked:
    """An exclusive lock on ``<cache file>.lock`` (no-op without a cache file or ``flock``)."""

    def __init__(self, cache_file: Path | None) -> None:
        self.cache_file, self.handle = cache_file, None

    def __enter__(self) -> None:
        if self.cache_file is None or fcntl is None:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.cache_file.with_suffix(".lock"), "a")
        except OSError as err:
            warnings.warn(
                f"Image index: cannot use the cache {self.cache_file.parent} ({err}); checking every file", stacklevel=2
            )
            return
        fcntl.flock(self.handle, fcntl.LOCK_EX)  # the first process builds; the others wait here, then reuse it

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()  # releases the lock


def _load(cache_file: Path | None) -> dict | None:
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            cached = {name: data[name] for name in data.files}
        if int(cached["version"]) != INDEX_VERSION:
            return None
        return cached
    except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        warnings.warn(f"Image index {cache_file} is unreadable ({err}); rebuilding it", stacklevel=2)
        return None


def _save(cache_file: Path | None, paths: PathList, stats: dict[str, np.ndarray], reasons: _Reasons) -> None:
    """Write the index atomically (a temporary file, then rename), so a reader never sees half of it."""
    if cache_file is None:
        return
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                version=np.int64(INDEX_VERSION),
                blob=paths.blob,
                offsets=paths.offsets,
                **stats,
                codes=reasons.codes,
                table=np.array(reasons.table, dtype=str),
            )
        os.replace(tmp, cache_file)
    except OSError as err:  # the cache saves time next run; failing to write it must not stop this one
        warnings.warn(f"Image index: could not write {cache_file} ({err})", stacklevel=2)
        with contextlib.suppress(OSError):  # (NotADirectoryError where the cache dir is a file)
            tmp.unlink(missing_ok=True)
