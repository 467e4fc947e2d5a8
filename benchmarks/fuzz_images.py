"""Fuzz tlkit's image decoding: damaged JPEG/PNG/WebP/GIF/HEIC/AVIF/TIFF/BMP/JPEG 2000 files must be listed with a
reason, never crash or hang.

Files: ``--count`` mutated copies of real photos (scikit-image), 64x64 and 48x80 px, in nine formats (``--formats``
picks some; HEIC through libheif, AVIF through libavif, compressed TIFF through libtiff, JPEG 2000 through OpenJPEG,
all behind PIL; TIFFs are 8-bit RGB, 16-bit or float grayscale). Mutations: bit
flips, random byte changes, truncations, zero-filled runs, zero-byte files, a PNG chunk with a bad CRC (the data
changed, the CRC not), absurd header dimensions (the header's CRC fixed so the decoder believes it), and one genuine
20000x20000 PNG decompression bomb (400 MP, 400 KB on disk).

Two stages, each in child processes so that a crash or a hang is counted instead of ending the benchmark:

- scan: every file goes through the source scan's check (``tlkit.data.sources.scan_images``, what ``load_source``
  runs); a child decodes files one after another and reports each, so a child that dies (a signal, e.g. libpng's
  abort) or stops reporting for ``--hang-s`` seconds is charged to the file it was on, and a new child resumes after
  it. Then ``load_source("folder:...")`` runs once over the whole folder (in a child) and its listing is counted.
- loader: in chunks of ``--chunk`` files, ``ImageDataModule`` (``num_workers=2``, 16-px output, so that JPEGs take
  the reduced-scale decode) scans a folder of the clean
  originals, then each file is overwritten with its mutated version (a file damaged after the scan), and the train
  and val loaders are read to the end; the files they replaced are read back from ``skipped_files.csv``.

``--speed N`` also times decoding N clean 64-px JPEGs and N PNGs: ``torchvision.io.decode_image`` (tlkit's decoder
before issue 11) against ``tlkit.data.sources.read_image`` (PIL for PNG, header check + EXIF), in this process.

    nice -n 10 python benchmarks/fuzz_images.py [--count 2000] [--seed 0] [--speed 500]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import queue
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

FORMATS = ("jpg", "png", "webp", "gif", "heic", "avif", "tif", "bmp", "jp2")
PIL_FORMATS = {
    "jpg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "heic": "HEIF", "avif": "AVIF", "tif": "TIFF",
    "bmp": "BMP", "jp2": "JPEG2000",
}  # fmt: skip
# TIFFs as scanners, microscopes and satellites write them, each decoded through libtiff (compressed) or PIL: 8-bit
# RGB, 16-bit and float (0..1) grayscale.
TIFF_KINDS = (("RGB", "tiff_deflate"), ("I;16", "tiff_lzw"), ("F", None))
MUTATIONS = ("bitflip", "bytes", "truncate", "zero_run", "empty", "bad_crc", "dims")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
SIZES = ((64, 64), (48, 80))  # (height, width): one non-square


# --------------------------------------------------------------------------- generating files


def clean_image(rng: np.random.Generator, fmt: str) -> bytes:
    """One small crop of a real photo, encoded as ``fmt``."""
    import skimage.data
    from PIL import Image

    import tlkit.data.decode  # noqa: F401 - registers the HEIC opener

    photo = getattr(skimage.data, PHOTOS[rng.integers(len(PHOTOS))])()
    height, width = SIZES[rng.integers(len(SIZES))]
    y, x = rng.integers(0, photo.shape[0] - height), rng.integers(0, photo.shape[1] - width)
    image = Image.fromarray(np.ascontiguousarray(photo[y : y + height, x : x + width]))
    buffer = io.BytesIO()
    if fmt != "tif":
        image.save(buffer, format=PIL_FORMATS[fmt])
        return buffer.getvalue()
    mode, compression = TIFF_KINDS[rng.integers(len(TIFF_KINDS))]
    gray = np.asarray(image.convert("L"), dtype=np.float32) / 255
    deep = {"RGB": image, "I;16": Image.fromarray((gray * 65535).astype(np.uint16)), "F": Image.fromarray(gray, "F")}
    deep[mode].save(buffer, format="TIFF", **({"compression": compression} if compression else {}))
    return buffer.getvalue()


def _png_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of every chunk of a PNG."""
    chunks, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.append((pos, kind))
        pos += 12 + length
    return chunks


def bad_crc(data: bytes, rng: np.random.Generator) -> bytes:
    """PNG: change one byte inside the IDAT data and keep the old CRC (libpng's abort); others: change a byte."""
    out = bytearray(data)
    idat = [pos for pos, kind in _png_chunks(data) if kind == b"IDAT"]
    start, end = (idat[0] + 8, idat[0] + 8 + struct.unpack(">I", data[idat[0] : idat[0] + 4])[0]) if idat else (0, 0)
    if end <= start:
        start, end = 0, len(data)
    out[int(rng.integers(start, end))] ^= 0xFF
    return bytes(out)


def absurd_dims(data: bytes, fmt: str, rng: np.random.Generator) -> bytes:
    """Rewrite the header's width and height to huge or zero values, keeping the header otherwise valid."""
    out = bytearray(data)
    side = int(rng.choice([0, 1, 20000, 65535, 1 << 20, (1 << 31) - 1]))
    if fmt == "png":  # IHDR data at 16..24, CRC recomputed so the decoder trusts the header
        out[16:24] = struct.pack(">II", side or 1 << 24, side)
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
    elif fmt == "jpg":
        sof = next((i for i in range(2, len(out) - 9) if out[i] == 0xFF and out[i + 1] in (0xC0, 0xC1, 0xC2)), None)
        if sof is not None:
            out[sof + 5 : sof + 9] = struct.pack(">HH", min(side, 65535), min(side, 65535) or 65535)
    elif fmt == "gif":  # logical screen and first image descriptor
        out[6:10] = struct.pack("<HH", min(side, 65535), min(side, 65535))
    elif fmt == "webp" and out[12:16] == b"VP8 ":  # lossy: 14-bit dimensions after the start code
        out[26:30] = struct.pack("<HH", min(side, 16383), min(side, 16383))
    elif fmt == "webp" and out[12:16] == b"VP8L":  # lossless: 14-bit width-1/height-1 packed after the signature
        out[21:25] = struct.pack("<I", 0x0FFFFFFF & int(rng.integers(1 << 28)))
    elif fmt == "jp2" and (ihdr := data.find(b"ihdr")) > 0:  # JPEG 2000's image header box: height, width
        out[ihdr + 4 : ihdr + 12] = struct.pack(">II", side or (1 << 32) - 1, side)
    elif fmt in ("heic", "avif") and (ispe := data.find(b"ispe")) > 0:  # HEIF's image extent box: version, w, h
        out[ispe + 8 : ispe + 16] = struct.pack(">II", side, side or (1 << 32) - 1)
    return bytes(out)


def mutate(data: bytes, fmt: str, mutation: str, rng: np.random.Generator) -> bytes:
    """Apply one mutation to an encoded image."""
    out = bytearray(data)
    if mutation == "bitflip":
        for pos in rng.integers(0, len(out), size=int(rng.integers(1, 9))):
            out[pos] ^= 1 << int(rng.integers(8))
    elif mutation == "bytes":
        for pos in rng.integers(0, len(out), size=3):
            out[pos] = int(rng.integers(256))
    elif mutation == "truncate":
        out = out[: int(rng.integers(1, len(out)))]
    elif mutation == "zero_run":
        start = int(rng.integers(0, len(out)))
        length = min(int(rng.integers(16, 257)), len(out) - start)
        out[start : start + length] = bytes(length)
    elif mutation == "empty":
        out = bytearray()
    elif mutation == "bad_crc":
        return bad_crc(data, rng)
    elif mutation == "dims":
        return absurd_dims(data, fmt, rng)
    return bytes(out)


def png_bomb(side: int = 20000) -> bytes:
    """A genuine ``side`` x ``side`` grayscale PNG of zeros: ~400 MB of pixels in ~400 KB."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def make_files(root: Path, count: int, seed: int, formats: tuple[str, ...] = FORMATS) -> list[tuple[Path, Path]]:
    """Write ``count`` mutated files under root/fuzz/<class>/ and their clean originals under root/clean/<class>/."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        fmt, mutation = formats[i % len(formats)], MUTATIONS[(i // len(formats)) % len(MUTATIONS)]
        clean = clean_image(rng, fmt)
        bad = png_bomb() if i == 0 else mutate(clean, fmt, mutation, rng)
        name = f"c{i % 2}/{i:05d}_{'bomb' if i == 0 else mutation}.{'png' if i == 0 else fmt}"
        for kind, data in (("clean", clean), ("fuzz", bad)):
            (root / kind / name).parent.mkdir(parents=True, exist_ok=True)
            (root / kind / name).write_bytes(data)
        pairs.append((root / "fuzz" / name, root / "clean" / name))
    return pairs


# --------------------------------------------------------------------------- children


def scan_child(list_file: str, start: int) -> None:
    """Check files from ``start`` on, one line of JSON each: ``[index, reason or null]``."""
    from tlkit.data.sources import scan_images

    paths = Path(list_file).read_text().splitlines()
    for index in range(start, len(paths)):
        bad = scan_images([paths[index]], workers=1)
        print(json.dumps([index, bad[0][1] if bad else None]), flush=True)


def loader_child(pairs_file: str, run_dir: str) -> None:
    """Scan the clean originals, damage them all, read the train and val loaders; print the counts as JSON."""
    import lightning as L

    from tlkit import ImageDataModule

    pairs = json.loads(Path(pairs_file).read_text())
    folder = Path(run_dir) / "data"
    for _, clean in pairs:
        target = folder / Path(clean).parent.name / Path(clean).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clean, target)
    # 16 px from 48-80 px files: nearly every JPEG is decoded at a reduced DCT scale (simplejpeg, then PIL's draft
    # for a file it refuses), the path the loaders take on photos; the scan above decoded them in full.
    dm = ImageDataModule(f"folder:{folder}", image_size=16, batch_size=16, num_workers=2, val_split=0.25)
    dm.trainer = L.Trainer(default_root_dir=run_dir, logger=False, enable_progress_bar=False, accelerator="cpu")
    dm.setup("fit")  # the scan: every original is readable
    for fuzz, clean in pairs:  # now damage every file, as if it changed after the scan
        shutil.copy(fuzz, folder / Path(clean).parent.name / Path(clean).name)
    images = sum(len(batch[0]) for loader in (dm.train_dataloader(), dm.val_dataloader()) for batch in loader)
    log = Path(run_dir) / "skipped_files.csv"
    listed = {row["path"] for row in csv.DictReader(log.open())} if log.exists() else set()
    print(json.dumps({"images": images, "listed": len(listed)}), flush=True)


# --------------------------------------------------------------------------- the parent


def _reader(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_scan(paths: list[Path], work: Path, hang_s: float) -> dict[str, int]:
    """Check every file in children; a child that dies or stalls is charged to its current file."""
    list_file = work / "files.txt"
    list_file.write_text("\n".join(map(str, paths)))
    counts = {"ok": 0, "listed": 0, "crashes": 0, "hangs": 0}
    index = 0
    while index < len(paths):
        cmd = [sys.executable, __file__, "--scan-child", str(list_file), str(index)]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_reader, args=(child.stdout, lines), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=hang_s + (30 if index == 0 else 10))  # + the child's start-up (imports)
            except queue.Empty:
                child.kill()
                counts["hangs"] += 1
                print(f"HANG on {paths[index]}", flush=True)
                index += 1
                break
            if line is None:  # the child ended: finished, or died on paths[index]
                if child.wait() != 0 and index < len(paths):
                    counts["crashes"] += 1
                    print(f"CRASH (exit {child.returncode}) on {paths[index]}", flush=True)
                    index += 1
                break
            done, reason = json.loads(line)
            counts["ok" if reason is None else "listed"] += 1
            index = done + 1
        child.wait()
    return counts


def run_load_source(folder: Path, timeout_s: float) -> str:
    """``load_source`` over the whole folder in a child: its listing count, or what went wrong."""
    code = f"from tlkit.data.sources import load_source; d = load_source('folder:{folder}'); print(len(d.skipped))"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "HANG"
    return done.stdout.strip() if done.returncode == 0 else f"CRASH (exit {done.returncode}): {done.stderr[-300:]}"


def run_loaders(pairs: list[tuple[Path, Path]], work: Path, chunk: int, timeout_s: float) -> dict[str, int]:
    """Loader stage in chunks, one child each; a child that dies or times out counts as a crash or a hang."""
    counts = {"chunks": 0, "images": 0, "listed": 0, "crashes": 0, "hangs": 0}
    for start in range(0, len(pairs), chunk):
        run_dir = work / f"loader{start:05d}"
        run_dir.mkdir()
        pairs_file = run_dir / "pairs.json"
        pairs_file.write_text(json.dumps([[str(f), str(c)] for f, c in pairs[start : start + chunk]]))
        cmd = [sys.executable, __file__, "--loader-child", str(pairs_file), str(run_dir)]
        counts["chunks"] += 1
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            counts["hangs"] += 1
            print(f"HANG in loader chunk {start}", flush=True)
            continue
        if done.returncode != 0:
            counts["crashes"] += 1
            print(f"CRASH (exit {done.returncode}) in loader chunk {start}: {done.stderr[-500:]}", flush=True)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        counts["images"] += result["images"]
        counts["listed"] += result["listed"]
    return counts


def decode_speed(n: int, repeats: int = 3) -> None:
    """Best-of-``repeats`` img/s of torchvision.io.decode_image against tlkit's read_image on clean 64-px files."""
    import warnings

    from torchvision.io import ImageReadMode, decode_image

    from tlkit.data.sources import read_image

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities")  # torchvision 0.29
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("jpg", "png"):
            paths = []
            for i in range(n):
                path = Path(tmp) / f"{i}.{fmt}"
                path.write_bytes(clean_image(rng, fmt))
                paths.append(str(path))
            rates = {}
            for name, decode in (
                ("torchvision.io.decode_image", lambda p: decode_image(p, mode=ImageReadMode.RGB)),
                ("tlkit read_image", read_image),
            ):
                best = min(_timed(decode, paths) for _ in range(repeats))
                rates[name] = n / best
                print(f"{n} {fmt.upper()}s of 64 px, {name:28s} {rates[name]:8.0f} img/s")
            ratio = rates["tlkit read_image"] / rates["torchvision.io.decode_image"]
            print(f"ratio tlkit / torchvision.io ({fmt.upper()}): {ratio:.2f}x")


def _timed(decode, paths: list[str]) -> float:
    start = time.perf_counter()
    for path in paths:
        decode(path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="mutated files to generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--chunk", type=int, default=250, help="files per loader child")
    parser.add_argument("--hang-s", type=float, default=20.0, help="seconds without progress that count as a hang")
    parser.add_argument("--speed", type=int, default=0, help="also time decoding this many clean JPEGs and PNGs")
    parser.add_argument("--scan-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--loader-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scan_child:
        return scan_child(args.scan_child[0], int(args.scan_child[1]))
    if args.loader_child:
        return loader_child(*args.loader_child)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        formats = tuple(args.formats.split(","))
        if unknown := set(formats) - set(FORMATS):
            parser.error(f"unknown formats {sorted(unknown)}; known: {', '.join(FORMATS)}")
        pairs = make_files(work, args.count, args.seed, formats)
        fuzz = [f for f, _ in pairs]
        scan = run_scan(fuzz, work, args.hang_s)
        listing = run_load_source(work / "fuzz", timeout_s=600)
        loaders = run_loaders(pairs, work, args.chunk, timeout_s=600)
    seconds = time.perf_counter() - start
    print(f"files {len(fuzz)} ({', '.join(formats)}; {', '.join(MUTATIONS)}; 1 PNG bomb), seed {args.seed}")
    print(f"scan:   decoded ok {scan['ok']}, listed with reason {scan['listed']}, crashes {scan['crashes']}, ", end="")
    print(f"hangs {scan['hangs']}; load_source over the whole folder listed {listing}")
    print(
        f"loader: {loaders['chunks']} chunks, {loaders['images']} images yielded, {loaders['listed']} damaged files "
        f"replaced and listed in skipped_files.csv, crashes {loaders['crashes']}, hangs {loaders['hangs']}"
    )
    print(
        f"crashes {scan['crashes'] + loaders['crashes']} (must be 0), hangs {scan['hangs'] + loaders['hangs']} "
        f"(must be 0), seconds {seconds:.1f}"
    )
    if args.speed:
        decode_speed(args.speed)
    if scan["crashes"] + scan["hangs"] + loaders["crashes"] + loaders["hangs"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
