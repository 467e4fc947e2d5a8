"""Which decoder tlkit should read images with: PIL, torchvision.io (deprecated in 0.29) or TorchCodec, measured.

Prints one table: decode time of a small JPEG (128 px), a 6-MP photo (3000x2000 JPEG, as in
``data_throughput.py --photos``; PIL also with ``draft`` at 1/4 scale), a 256-px PNG; which formats each decodes
(JPEG, PNG, WebP, GIF, BMP, TIFF); whether it applies the EXIF orientation; whether 16-bit PNG, CMYK JPEG and palette
PNG come out as PIL (the reference) shows them; and crashes on issue 8's fuzz set (``fuzz_images.make_files``: every
file decoded by each decoder in a child process, so a decoder that aborts the process is counted, not fatal).
Before the table, the 6-MP photo decoded at 1/2, 1/4 and 1/8 to a uint8 tensor by PIL's ``draft`` and by
``simplejpeg`` (the same pixels; what tlkit's loaders use when a crop or resize needs fewer pixels).

    python benchmarks/decoders.py [--repeats 20] [--fuzz 400]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

FORMATS = ("JPEG", "PNG", "WebP", "GIF", "BMP", "TIFF")


def pil(data: bytes, draft: int = 1) -> torch.Tensor:
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    if draft > 1:
        img.draft("RGB", (img.size[0] // draft, img.size[1] // draft))
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):
        return torch.from_numpy(np.rint(np.asarray(img, dtype=np.float64) / 257).astype(np.uint8)).expand(3, -1, -1)
    return torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1)


def torchvision_io(data: bytes) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)


def torchcodec(data: bytes) -> torch.Tensor:
    from torchcodec.decoders import decode_image

    return decode_image(data, mode="RGB")


def tlkit(data: bytes) -> torch.Tensor:
    from tlkit.data.decode import read_image

    return read_image(data)


def simplejpeg_reduced(data: bytes, scale: int) -> torch.Tensor:
    """A JPEG at 1/scale as tlkit's reduced decode reads it (``tlkit.data.decode._decode_reduced_jpeg``)."""
    import simplejpeg

    height, width = simplejpeg.decode_jpeg_header(data)[:2]
    array = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // scale), min_width=-(-width // scale))
    return torch.from_numpy(array).permute(2, 0, 1)


DECODERS = {"PIL": pil, "torchvision.io": torchvision_io, "TorchCodec": torchcodec, "tlkit.read_image": tlkit}


# --------------------------------------------------------------------------- test images


def photo(width: int, height: int, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    import skimage.data
    from PIL import Image

    base = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(base, dtype=np.float64) + np.random.default_rng(seed).normal(0, noise, (height, width, 3))
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, **kwargs) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def odd_files() -> dict[str, bytes]:
    """Files whose mode or orientation a decoder may get wrong."""
    from PIL import Image

    small = photo(96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned by 90 degrees
    sixteen = io.BytesIO()
    Image.fromarray(small[..., 0].astype(np.uint16) * 257).save(sixteen, format="PNG")
    cmyk = io.BytesIO()
    Image.fromarray(small).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    palette = io.BytesIO()
    Image.fromarray(small).convert("P").save(palette, format="PNG")
    return {
        "EXIF orientation": encode(small, "JPEG", quality=95, exif=exif),
        "16-bit PNG": sixteen.getvalue(),
        "CMYK JPEG": cmyk.getvalue(),
        "palette PNG": palette.getvalue(),
    }


# --------------------------------------------------------------------------- measurements


def ms_per_decode(decode, data: bytes, repeats: int) -> float | None:
    try:
        decode(data)
    except Exception:  # noqa: BLE001 - a decoder that cannot read the format gets no time
        return None
    start = time.perf_counter()
    for _ in range(repeats):
        decode(data)
    return (time.perf_counter() - start) / repeats * 1e3


def reads(decode, data: bytes, reference: torch.Tensor | None = None) -> str:
    try:
        image = decode(data)
    except Exception as err:  # noqa: BLE001
        return f"no ({type(err).__name__})"
    if reference is None:
        return "yes"
    if image.shape != reference.shape:
        return f"wrong shape {tuple(image.shape)}"
    diff = (image.float() - reference.float()).abs().mean().item()
    return "yes" if diff < 2.0 else f"differs ({diff:.0f} levels)"


def fuzz_child(list_file: str, decoder: str) -> None:
    """Decode the listed files one by one; print each index as it is done, so a crash names the file."""
    for index, path in enumerate(Path(list_file).read_text().splitlines()):
        try:
            DECODERS[decoder](Path(path).read_bytes())
        except Exception:  # noqa: BLE001 - an error is the right answer to a damaged file
            pass
        print(index, flush=True)


def fuzz_crashes(paths: list[Path], decoder: str, work: Path) -> list[str]:
    """Files whose decoding killed the process (a signal or abort); a new child resumes after each."""
    crashes, start = [], 0
    while start < len(paths):
        listing = work / f"{decoder}.txt"
        listing.write_text("\n".join(map(str, paths[start:])))
        done = subprocess.run(
            [sys.executable, __file__, "--fuzz-child", str(listing), decoder], capture_output=True, text=True
        )
        finished = len(done.stdout.split())
        if done.returncode == 0:
            break
        crashes.append(paths[start + finished].name)
        start += finished + 1
    return crashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fuzz", type=int, default=400, help="mutated files of fuzz_images.py (0: none)")
    parser.add_argument("--fuzz-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # torchvision 0.29's deprecation warning on every call
    if args.fuzz_child:
        fuzz_child(*args.fuzz_child)
        return
    torch.set_num_threads(1)
    small, big = encode(photo(128, 128), "JPEG", quality=90), encode(photo(3000, 2000, noise=2), "JPEG", quality=90)
    png = encode(photo(256, 256), "PNG")
    rows: dict[str, dict[str, str]] = {name: {} for name in DECODERS}
    for name, decode in DECODERS.items():
        for label, data, repeats in (("128-px JPEG", small, 20 * args.repeats), ("6-MP JPEG", big, args.repeats)):
            rows[name][label] = _fmt(ms_per_decode(decode, data, repeats))
        rows[name]["256-px PNG"] = _fmt(ms_per_decode(decode, png, 5 * args.repeats))
    rows["PIL"]["6-MP JPEG"] += f" (draft 1/4: {_fmt(ms_per_decode(lambda d: pil(d, 4), big, args.repeats))})"
    for scale in (2, 4, 8):  # the reduced decode of the training and evaluation loaders: the two ways to it
        drafted = _fmt(ms_per_decode(lambda d, scale=scale: pil(d, scale), big, args.repeats))
        direct = _fmt(ms_per_decode(lambda d, scale=scale: simplejpeg_reduced(d, scale), big, args.repeats))
        print(f"6-MP JPEG at 1/{scale} to a uint8 tensor: PIL draft {drafted}, simplejpeg {direct}")
    pixels = photo(64, 48)
    for fmt in FORMATS:
        data = encode(pixels, fmt, **({"quality": 95} if fmt in ("JPEG", "WebP") else {}))
        for name, decode in DECODERS.items():
            rows[name][fmt] = reads(decode, data)
    for label, data in odd_files().items():
        reference = pil(data)
        for name, decode in DECODERS.items():
            rows[name][label] = reads(decode, data, reference)
    if args.fuzz:
        sys.path.insert(0, str(Path(__file__).parent))
        from fuzz_images import make_files

        with tempfile.TemporaryDirectory() as tmp:
            paths = [fuzz for fuzz, _ in make_files(Path(tmp), args.fuzz, seed=0)]
            for name in DECODERS:
                crashed = fuzz_crashes(paths, name, Path(tmp))
                rows[name][f"crashes on {args.fuzz} fuzzed files"] = str(len(crashed))
                print(f"{name} crashed on: {crashed}")
    print_table(rows)
    print(json.dumps(rows))


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f} ms"


def print_table(rows: dict[str, dict[str, str]]) -> None:
    keys = list(next(iter(rows.values())))
    print("| | " + " | ".join(rows) + " |")
    print("|---" * (len(rows) + 1) + "|")
    for key in keys:
        print(f"| {key} | " + " | ".join(rows[name][key] for name in rows) + " |")


if __name__ == "__main__":
    main()
