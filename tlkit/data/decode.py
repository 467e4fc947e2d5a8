"""Decoding image files and arrays to ``uint8`` ``(3, H, W)`` RGB tensors, upright, within a pixel limit.

Which decoder reads what (measured by ``benchmarks/decoders.py``, see docs/data_at_scale.md):

- a JPEG: ``simplejpeg`` (libjpeg-turbo), at full size or, when the caller needs it smaller (``min_size``), at 1/2,
  1/4 or 1/8 scale straight from the DCT coefficients, never below ``min_size`` — several times faster on a phone
  photo that becomes a 224-px crop. At full size it is as fast as TorchCodec's ``decode_jpeg`` on small JPEGs, with
  the same pixels; smaller, it gives the pixels of PIL's ``draft``, without PIL's copies of the image (orientation,
  mode, ``tobytes``, numpy: a 6-MP photo at 1/4, 9.3 against 13.6 ms). The EXIF orientation is PIL's reading of the
  header, applied here: TorchCodec applied its own, which misses an EXIF block that follows an XMP block (a photo
  turned on one path and not on another). A file simplejpeg refuses (it is strict: any libjpeg warning, e.g.
  extraneous bytes some cameras write, is an error) goes to PIL, which decides;
- every other format (PNG, WebP, GIF, BMP, TIFF, AVIF), CMYK JPEGs and 16-bit images: PIL, which raises a Python
  error on damaged files where libpng (behind ``torchvision.io.decode_png`` and TorchCodec's ``decode_png``) may
  abort the process (issue 8);
- HEIC/HEIF (what iPhones save photos as): PIL with ``pillow-heif``'s opener (libheif), registered on import.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pillow_heif
import simplejpeg
import torch
from PIL import Image, ImageOps
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.functional import pil_to_tensor

# PIL reads AVIF itself but HEIC only through this plugin; libheif applies the file's rotation and mirroring while
# decoding and hands PIL an orientation of 1, so ImageOps.exif_transpose never turns a HEIC photo twice.
pillow_heif.register_heif_opener()

# Default pixel limit of a decoded file: PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS, ~179 MP), not its ~89 MP
# warning level, so that 108 MP phone photos (12000x9000) load, while a 20000x20000 "bomb" (400 MP) is refused.
MAX_IMAGE_PIXELS: int = 178_956_970
# EXIF orientations 5-8 turn the image by 90 degrees: width and height swap.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})

# ``min_size(height, width)`` of the upright full image -> the smallest (height, width) it may be decoded at.
MinSize = Callable[[int, int], tuple[int, int]]


class ImageTooLargeError(ValueError):
    """An image file declares more pixels than the decoding limit allows (a decompression bomb, or a huge photo)."""


def read_image(
    sample: str | os.PathLike | bytes | np.ndarray | torch.Tensor,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    *,
    min_size: MinSize | None = None,
) -> torch.Tensor:
    """Decode or convert one sample to a ``uint8`` ``(3, H, W)`` RGB tensor.

    Files are shown the way people see them: the EXIF orientation (JPEG, PNG ``eXIf``, WebP, TIFF) is applied.

    Args:
        sample: A file path, an encoded file's bytes, a ``uint8`` numpy array (``HxW``, ``HxWx1``, ``HxWx3`` or
            ``HxWx4``), or a ``uint8`` tensor (``HxW`` or ``CxHxW`` with C in 1, 3, 4). Alpha is composited over white
            (:func:`on_white`), for files and arrays alike.
        max_pixels: Largest width x height a file may declare before anything is decoded (None: no limit).
        min_size: For files: called with the upright image's ``(height, width)`` from its header; returns the
            smallest ``(height, width)`` the caller needs. A JPEG is then decoded at the largest DCT reduction
            (1/2, 1/4, 1/8) that keeps both sides at least that; other files at full size. None: full size.

    Returns:
        ``uint8`` tensor of shape ``(3, H, W)``: contiguous for arrays and tensors; for decoded files, a view of
        channels-last (HWC) memory, which the uint8 resize kernels read fastest.

    Raises:
        FileNotFoundError: The file (or a symlink's target) does not exist.
        ImageTooLargeError: The file declares more than ``max_pixels`` pixels.
        ValueError: The file cannot be decoded (the message names it).

    Example:
        >>> image = read_image("photo.jpg", min_size=lambda h, w: (h // 4, w // 4))  # doctest: +SKIP
    """
    if isinstance(sample, str | os.PathLike):
        return _decode_file(Path(sample), max_pixels, min_size)
    if isinstance(sample, bytes | bytearray | memoryview):  # an encoded file in memory (e.g. from a shard)
        return _decode_stream(io.BytesIO(sample), "<encoded image in memory>", max_pixels, min_size)
    if isinstance(sample, np.ndarray):
        if sample.ndim == 3:
            sample = sample.transpose(2, 0, 1)  # HWC -> CHW
        # Copy: cached source arrays may be read-only and must never be mutated through the tensor.
        return _to_rgb_chw(torch.tensor(sample), "numpy array")
    if isinstance(sample, torch.Tensor):
        return _to_rgb_chw(sample.clone(), "tensor")
    if callable(getattr(sample, "load", None)):  # e.g. an item of a torchvision dataset
        return _to_rgb_chw(sample.load(), "dataset item")
    raise TypeError(f"Unsupported sample type {type(sample).__name__}; expected a path, numpy array or tensor")


def upright_size(img: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of an opened image once its EXIF orientation is applied (read from the header only)."""
    width, height = img.size
    orientation = img.getexif().get(0x0112)
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


def _decode_file(path: Path, max_pixels: int | None, min_size: MinSize | None) -> torch.Tensor:
    """Decode an image file to uint8 RGB CHW, upright, within the pixel limit; any failure names the file."""
    if not path.is_file():
        target = f" (a symlink to {os.readlink(path)}, which does not exist)" if path.is_symlink() else ""
        raise FileNotFoundError(f"Image file not found: {path}{target}")
    with open(path, "rb") as file:
        return _decode_stream(file, path, max_pixels, min_size)


def _decode_stream(file: BinaryIO, name: Path | str, max_pixels: int | None, min_size: MinSize | None) -> torch.Tensor:
    try:
        with open_within_limit(name, file, max_pixels) as img:
            return _decode_opened(file, img, min_size)
    except ImageTooLargeError:
        raise
    # Any exception: PIL's plugins raise OSError, SyntaxError, struct.error, IndexError, ... on damaged files, and
    # one bad file must become one named, skippable error, never a crash of the scan or of a loader worker.
    except Exception as err:
        raise ValueError(f"Could not decode image {name}: {err}") from err
    # No .contiguous(): decoders return a (3, H, W) view of HWC memory (channels-last), which torchvision's uint8
    # resize kernels read ~1.6x faster than planar CHW; copying it to CHW would cost a pass and slow the resize.


def open_within_limit(path: Path | str, file: BinaryIO, max_pixels: int | None) -> Image.Image:
    """Open an image file with PIL (header only) and refuse it when it declares more than ``max_pixels`` pixels."""
    _let_pil_open(max_pixels)
    try:
        img = Image.open(file)
    except Image.DecompressionBombError as err:  # PIL's own, fixed limit: say which setting to change
        raise ImageTooLargeError(f"Image {path} is too large to decode: {err} {_limit_hint(max_pixels)}") from err
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"Image {path} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            f"(a guard against decompression bombs). {_limit_hint(max_pixels)}"
        )
    return img


def _limit_hint(max_pixels: int | None) -> str:
    return (
        f"If the file is genuine, raise max_image_pixels (now {max_pixels}) on the ImageDataModule or load_source, "
        "or set it to None for no limit."
    )


def _let_pil_open(max_pixels: int | None) -> None:
    """PIL refuses files over ``2 * Image.MAX_IMAGE_PIXELS`` when opening them, before our own check runs. Our limit
    is the one users set, so PIL's is lifted to it when it is higher (only ever raised, never lowered)."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (max_pixels is None or max_pixels > 2 * current):
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max_pixels // 2 + 1


def _decode_opened(file: BinaryIO, img: Image.Image, min_size: MinSize | None) -> torch.Tensor:
    """Decode an opened file with the decoder that is best for it (see the module docstring)."""
    if img.format == "JPEG" and img.mode in ("RGB", "L"):  # CMYK/YCCK: PIL converts them exactly
        return _decode_jpeg(file, img, _dct_scale(img, min_size) if min_size is not None else 1)
    return pil_to_rgb(ImageOps.exif_transpose(img))


def _dct_scale(img: Image.Image, min_size: MinSize) -> int:
    """The largest DCT reduction (8, 4, 2, else 1) that keeps the upright image at least ``min_size``, chosen as
    PIL's ``draft`` chooses it."""
    height, width = upright_size(img)
    need_h, need_w = min_size(height, width)
    raw_w, raw_h = img.size  # the stored image: turned by 90 degrees, its sides are the upright's swapped
    if (raw_h, raw_w) != (height, width):
        need_h, need_w = need_w, need_h
    room = min(raw_h // max(need_h, 1), raw_w // max(need_w, 1))  # 0: the caller needs more than the image has
    return next((scale for scale in (8, 4, 2) if scale <= room), 1)


def _decode_jpeg(file: BinaryIO, img: Image.Image, scale: int) -> torch.Tensor:
    """A plain (RGB or grayscale) JPEG decoded at 1/``scale`` (1: full size), upright."""
    raw_w, raw_h = img.size
    file.seek(0)
    try:  # libjpeg-turbo's smallest scaling that keeps these sides is 1/scale (rounded up, as libjpeg rounds)
        array = simplejpeg.decode_jpeg(file.read(), "RGB", min_height=-(-raw_h // scale), min_width=-(-raw_w // scale))
    except ValueError:  # simplejpeg is stricter than PIL (any libjpeg warning is an error): PIL decides
        img.draft("RGB", (raw_w // scale, raw_h // scale))  # (draft reduces by the largest power of 2 <= W // w)
        return pil_to_rgb(ImageOps.exif_transpose(img))
    return _upright(torch.from_numpy(array).permute(2, 0, 1), img.getexif().get(0x0112))


def _upright(image: torch.Tensor, orientation: int | None) -> torch.Tensor:
    """A ``(C, H, W)`` image as its EXIF orientation says to show it (PIL's ``exif_transpose``, on a tensor)."""
    turn = {
        2: lambda x: x.flip(-1),  # mirrored
        3: lambda x: x.flip(-2, -1),  # upside down
        4: lambda x: x.flip(-2),
        5: lambda x: x.transpose(-2, -1),
        6: lambda x: torch.rot90(x, -1, (-2, -1)),  # stored turned 90 degrees anticlockwise: turn it clockwise
        7: lambda x: x.transpose(-2, -1).flip(-2, -1),
        8: lambda x: torch.rot90(x, 1, (-2, -1)),
    }.get(orientation)
    return turn(image) if turn else image


def pil_to_rgb(img: Image.Image) -> torch.Tensor:
    """A decoded PIL image as a ``uint8`` ``(3, H, W)`` tensor: 16-bit and float images rescaled, transparency over
    white."""
    if img.mode.startswith("I") or img.mode == "F":  # PIL's convert("RGB") clips these to 0..255: rescale instead
        return read_image(_scaled_to_uint8(np.asarray(img, dtype=np.float64), img.mode))
    if img.has_transparency_data:  # RGBA, LA, PA, or a palette / colour key with a transparent entry (GIF, tRNS)
        return pil_to_tensor(on_white(img))
    return pil_to_tensor(img.convert("RGB"))


def _scaled_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """A single-channel integer or float image scaled from its full range to 0..255.

    Integers (a 16-bit PNG or TIFF, opened as mode ``I;16`` or ``I``) span 0..65535; floats (a float TIFF, mode
    ``F``) 0..1, the convention of scikit-image, tifffile and torchvision's ``to_dtype``. PIL's ``convert("RGB")``
    clips both to 0..255 instead: a float image in 0..1 came out black, a 16-bit one nearly white. Values outside
    the range (a 32-bit or signed image, CT numbers, floats in 0..255, NaN) have no one right scale, so they are an
    error, not clipped.
    """
    full = 1.0 if mode == "F" else 65535.0
    kind = "float" if mode == "F" else "integer"
    what = f"{'a' if mode == 'F' else 'an'} {kind} image (PIL mode {mode})"
    if not np.isfinite(array).all():
        raise ValueError(f"{what} with NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > full:
        raise ValueError(
            f"{what} with values in [{low:g}, {high:g}]: {kind} images are read as "
            f"0..{full:g}; rescale it to that range (or save it as an 8-bit image)"
        )
    return np.rint(array * (255.0 / full)).astype(np.uint8)


def on_white(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it on a white page: its alpha composited over white.

    PIL's ``convert("RGB")`` (what timm, torchvision and fastai loaders use) drops alpha instead and shows whatever
    colour the file stores under the transparent pixels: usually black, which makes black line art, signatures and
    logos on a transparent background an all-black image, and sometimes the background a cut-out removed.
    """
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def _to_rgb_chw(image: torch.Tensor, what: str) -> torch.Tensor:
    """Validate a uint8 HW/CHW tensor and expand it to 3 channels."""
    if image.dtype != torch.uint8:
        raise TypeError(f"Expected a uint8 {what}, got {image.dtype}")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"Expected a {what} image with 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.shape[0] == 4:  # RGBA in memory: as the same image read from a file
        return pil_to_tensor(on_white(Image.fromarray(image.permute(1, 2, 0).numpy(), "RGBA")))
    return image[:3].contiguous()


class RandomResizedCropDecoder:
    """Decode a sample and take a random resized crop of it, with the crop drawn *before* decoding, so that a JPEG is
    decoded at the smallest DCT scale (1/2, 1/4, 1/8) at which the crop still has at least the output's pixels.

    The result has the distribution of decoding in full and then applying ``v2.RandomResizedCrop(size, scale, ratio)``
    (the same draw from torch's generator, on the upright full-size image), resized from fewer pixels: a 224-px crop
    of a 12-MP photo rarely needs more than 1/4 of it.

    Args:
        crop: The ``v2.RandomResizedCrop`` to apply (its size, scale, ratio and interpolation).
        max_pixels: Pixel limit of files (see :func:`read_image`).
    """

    def __init__(self, crop: v2.RandomResizedCrop, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
        self.crop, self.max_pixels = crop, max_pixels

    def __call__(self, sample: str | os.PathLike | np.ndarray | torch.Tensor) -> torch.Tensor:
        drawn: list[tuple[int, int, int, int, int, int]] = []

        def min_size(height: int, width: int) -> tuple[int, int]:
            top, left, crop_h, crop_w = self._draw(height, width)
            drawn.append((top, left, crop_h, crop_w, height, width))
            out_h, out_w = self.crop.size
            return math.ceil(height * out_h / crop_h), math.ceil(width * out_w / crop_w)

        image = read_image(sample, self.max_pixels, min_size=min_size)
        height, width = image.shape[-2:]
        if drawn:  # drawn on the full-size image: scale the box to the decoded one
            top, left, crop_h, crop_w, full_h, full_w = drawn[0]
            sy, sx = height / full_h, width / full_w
            top, left = min(round(top * sy), height - 1), min(round(left * sx), width - 1)
            crop_h, crop_w = (
                max(1, min(round(crop_h * sy), height - top)),
                max(1, min(round(crop_w * sx), width - left)),
            )
        else:  # an array: nothing to plan
            top, left, crop_h, crop_w = self._draw(height, width)
        return v2.functional.resized_crop(
            image, top, left, crop_h, crop_w, list(self.crop.size), self.crop.interpolation, antialias=True
        )

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's draw of a crop box for an image of this size (a view of no memory stands in for it)."""
        stand_in = torch.empty(1, 1, 1).expand(1, height, width)
        return RandomResizedCrop.get_params(stand_in, list(self.crop.scale), list(self.crop.ratio))
