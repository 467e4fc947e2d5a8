"""Tests for tlkit.data.decode: reduced-DCT JPEG decoding and the random crop drawn before decoding."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from tlkit.data.datamodule import EvalResizeSize, ImageDataModule
from tlkit.data.decode import RandomResizedCropDecoder, read_image


def _photo_jpeg(path: Path, width: int = 800, height: int = 600, orientation: int | None = None) -> Path:
    """A real photo (scikit-image's astronaut) at ``width`` x ``height``, as a JPEG."""
    image = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.BICUBIC)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95, exif=exif)
    return path


def _mean_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_jpeg_is_decoded_at_the_smallest_dct_scale_that_keeps_min_size(tmp_path: Path) -> None:
    path = _photo_jpeg(tmp_path / "a.jpg")
    asked = []
    reduced = read_image(path, min_size=lambda h, w: asked.append((h, w)) or (100, 100))
    assert asked == [(600, 800)] and reduced.shape == (3, 150, 200)  # 1/4: 1/8 would be 75 rows, under 100
    assert read_image(path, min_size=lambda h, w: (151, 10)).shape == (3, 300, 400)  # never below: 1/2
    assert read_image(path, min_size=lambda h, w: (301, 10)).shape == (3, 600, 800)  # no reduction possible
    assert read_image(path, min_size=lambda h, w: (1200, 1600)).shape == (3, 600, 800)  # more than it has: in full
    full = read_image(path)
    assert _mean_diff(reduced, v2.functional.resize(full, [150, 200], antialias=True)) < 2.5


def test_reduced_decode_is_upright(tmp_path: Path) -> None:
    """EXIF orientation 6 (stored sideways): min_size sees the upright size, the result is upright."""
    path = _photo_jpeg(tmp_path / "r.jpg", width=800, height=600, orientation=6)
    asked = []
    image = read_image(path, min_size=lambda h, w: asked.append((h, w)) or (h // 4, w // 4))
    full = read_image(path)
    assert asked == [(800, 600)] and full.shape == (3, 800, 600) and image.shape == (3, 200, 150)
    assert _mean_diff(image, v2.functional.resize(full, [200, 150], antialias=True)) < 2.5


def test_png_and_arrays_ignore_min_size(tmp_path: Path) -> None:
    Image.open(_photo_jpeg(tmp_path / "a.jpg")).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png", min_size=lambda h, w: (10, 10)).shape == (3, 600, 800)


def test_crop_drawn_before_decoding_matches_the_crop_after_a_full_decode(tmp_path: Path) -> None:
    path = _photo_jpeg(tmp_path / "a.jpg")
    crop = v2.RandomResizedCrop([48, 48], antialias=True)
    decoder = RandomResizedCropDecoder(crop)
    full = read_image(path)
    for seed in range(5):
        torch.manual_seed(seed)
        fused = decoder(str(path))
        torch.manual_seed(seed)
        reference = crop(full)
        other = crop(full)  # the next draw: another crop
        # The same box, resized from fewer pixels (libjpeg's DCT scaling, box corners rounded to the reduced grid):
        # a few grey levels apart on this detailed photo, where another crop is ~70 apart.
        assert fused.shape == (3, 48, 48) and _mean_diff(fused, reference) < 0.2 * _mean_diff(other, reference)


def test_crop_decoder_decodes_only_what_the_crop_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tlkit.data import decode

    scales = []
    real = decode._dct_scale
    monkeypatch.setattr(decode, "_dct_scale", lambda img, min_size: scales.append(real(img, min_size)) or scales[-1])
    path = _photo_jpeg(tmp_path / "a.jpg")
    RandomResizedCropDecoder(v2.RandomResizedCrop([32, 32], scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3)))(str(path))
    assert scales == [8]  # the whole 800x600 photo as a 32-px image: 1/8 (100x75) is still over 32 px


def test_crop_decoder_on_arrays_draws_like_random_resized_crop() -> None:
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    crop = v2.RandomResizedCrop([16, 16], antialias=True)
    torch.manual_seed(0)
    fused = RandomResizedCropDecoder(crop)(image)
    torch.manual_seed(0)
    assert torch.equal(fused, crop(image))


@pytest.mark.parametrize(
    ("config", "size", "expected"),
    [
        (dict(input_size=(3, 224, 224), crop_pct=0.875), (3000, 4000), (256, 342)),  # shorter side to 256
        (dict(input_size=(3, 224, 224), crop_pct=0.875, crop_mode="squash"), (3000, 4000), (256, 256)),
        (dict(input_size=(3, 224, 224), crop_pct=0.875, crop_mode="border"), (3000, 4000), (192, 256)),
        (dict(input_size=(3, 224, 224), crop_pct=0.875, resize_size=[232]), (4000, 3000), (310, 232)),
    ],
)
def test_eval_resize_size_is_what_the_eval_transform_resizes_to(config: dict, size: tuple, expected: tuple) -> None:
    assert EvalResizeSize(config)(*size) == expected


def test_loaders_with_reduced_decoding_match_full_decoding(tmp_path: Path) -> None:
    for c in ("a", "b"):
        for i in range(2):
            _photo_jpeg(tmp_path / c / f"{i}.jpg", width=640 + 32 * i, height=480)
    kwargs = dict(source=f"folder:{tmp_path}", image_size=32, batch_size=4, val_split=0.5, augment="none")
    fast, exact = ImageDataModule(**kwargs), ImageDataModule(**kwargs, reduced_jpeg_decode=False)
    fast_val, exact_val = (next(iter(dm.val_dataloader()))[0] for dm in (fast, exact))
    assert fast_val.shape == exact_val.shape == (2, 3, 32, 32) and _mean_diff(fast_val, exact_val) < 3.0
    assert not torch.equal(fast_val, exact_val)  # decoded at 1/8 scale (36 px -> 60x80), not in full
    train = ImageDataModule(**{**kwargs, "augment": "basic"})
    images, _ = next(iter(train.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    assert np.unique(images.numpy()).size > 50  # real image content, not a constant


def _pil_draft(path: Path, scale: int) -> torch.Tensor:
    """PIL's own reduced decode (``draft``), upright: what tlkit decoded with before simplejpeg."""
    from PIL import ImageOps

    img = Image.open(path)
    img.draft("RGB", (img.size[0] // scale, img.size[1] // scale))
    return torch.from_numpy(np.asarray(ImageOps.exif_transpose(img).convert("RGB")).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decode_has_the_pixels_of_pil_draft_for_every_orientation(tmp_path: Path, orientation: int) -> None:
    """simplejpeg (one array) gives exactly PIL's draft pixels, turned as PIL's exif_transpose turns them."""
    path = _photo_jpeg(tmp_path / "o.jpg", width=801, height=603, orientation=orientation)  # odd sides: rounding
    for scale, need in ((2, 300), (4, 150), (8, 75)):
        image = read_image(path, min_size=lambda h, w, need=need: (need, need))
        assert torch.equal(image, _pil_draft(path, scale)), (orientation, scale)


def test_reduced_decode_of_a_grayscale_jpeg_is_rgb(tmp_path: Path) -> None:
    path = tmp_path / "g.jpg"
    Image.fromarray(skimage.data.camera()).save(path, quality=90)  # 512x512, mode L
    image = read_image(path, min_size=lambda h, w: (100, 100))
    assert image.shape == (3, 128, 128) and torch.equal(image, _pil_draft(path, 4))


def test_jpeg_simplejpeg_refuses_but_pil_reads_is_decoded_by_pil(tmp_path: Path) -> None:
    """Bytes some cameras leave before the end marker make libjpeg warn ("extraneous bytes"): simplejpeg refuses
    such a file, PIL reads it, and so does tlkit, at the reduced scale. A truncated file is still an error."""
    import simplejpeg

    path = _photo_jpeg(tmp_path / "x.jpg")
    data = path.read_bytes()
    path.write_bytes(data[:-2] + b"x" * 100 + data[-2:])  # "97 extraneous bytes before marker 0xd9"
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(path.read_bytes(), "RGB", min_height=150, min_width=200)
    image = read_image(path, min_size=lambda h, w: (150, 200))
    assert image.shape == (3, 150, 200) and torch.equal(image, _pil_draft(path, 4))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.jpg"):
        read_image(cut, min_size=lambda h, w: (150, 200))


@pytest.mark.parametrize(
    "options",
    [
        dict(progressive=True),
        dict(subsampling=0),  # 4:4:4
        dict(subsampling=1),  # 4:2:2
        dict(subsampling=2),  # 4:2:0
        dict(optimize=True),  # optimised Huffman tables
        dict(quality=30),
        dict(restart_marker_blocks=4),  # restart markers, as some cameras write
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()),
)
def test_reduced_decode_has_the_pixels_of_pil_draft_for_every_kind_of_jpeg(tmp_path: Path, options: dict) -> None:
    path = tmp_path / "k.jpg"
    Image.fromarray(skimage.data.astronaut()).resize((801, 603)).save(path, **options)
    for scale, need in ((2, 300), (4, 150), (8, 75)):
        assert torch.equal(read_image(path, min_size=lambda h, w, need=need: (need, need)), _pil_draft(path, scale))


def _app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


@pytest.mark.parametrize("min_size", [None, lambda h, w: (h // 2, w // 2)])
def test_exif_block_after_an_xmp_block_turns_the_photo_on_every_path(tmp_path: Path, min_size) -> None:
    """Tools other than PIL may write XMP before EXIF. TorchCodec (then the full-size path) read only the first APP1
    block and left the photo sideways, while the reduced path and the crop planning (PIL's reading) turned it: the
    crop box was then drawn on one shape and cut from another."""
    stored = Image.fromarray(skimage.data.astronaut()[:96, :160])  # 160 wide, 96 high; orientation 6: turn it
    path = tmp_path / "xmp_then_exif.jpg"
    stored.save(path, quality=95)
    xmp = _app1(b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    exif = _app1(b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00" + bytes(6))
    data = path.read_bytes()
    path.write_bytes(data[:2] + xmp + exif + data[2:])
    with Image.open(path) as img:
        upright = torch.from_numpy(np.array(ImageOps.exif_transpose(img).convert("RGB"))).permute(2, 0, 1)
    assert upright.shape[1:] == (160, 96)
    image = read_image(path, min_size=min_size)
    if min_size is None:
        assert torch.equal(image, upright)
    else:
        assert image.shape[1:] == (80, 48)
        small = v2.functional.resize(upright, [80, 48], antialias=True)
        assert (image.float() - small.float()).abs().mean() < 8  # the same picture, not one turned by 90 degrees


@pytest.mark.parametrize("options", [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2, "progressive": True}])
def test_full_size_jpeg_has_the_pixels_of_torchcodec(tmp_path: Path, options: dict) -> None:
    """simplejpeg replaced TorchCodec for full-size JPEGs (docs/data_at_scale.md): the same libjpeg-turbo pixels."""
    from torchcodec.decoders import decode_jpeg

    path = tmp_path / "photo.jpg"
    Image.fromarray(skimage.data.coffee()).save(path, quality=85, **options)
    assert torch.equal(read_image(path), decode_jpeg(str(path), mode="RGB"))
