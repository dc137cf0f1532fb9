"""Decoding and preprocessing of user images (flowcore.data.images): formats, refusals, polarity, alpha."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from flowcore.data.images import (
    WORKING_SIDE,
    ImageError,
    Preprocessed,
    decode_image,
    is_grayscale,
    load_image_file,
    preprocess,
)


def _digit(size: int = 28, fg: int = 255, bg: int = 0) -> np.ndarray:
    """A light (or dark) bar-shaped "digit" in the middle of a plain background."""
    a = np.full((size, size), bg, np.uint8)
    a[size // 4 : 3 * size // 4, size // 2 - 2 : size // 2 + 2] = fg
    return a


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF"] + (["WEBP"] if features.check("webp") else [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(fmt):
    rgb = np.zeros((24, 40, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, 40, dtype=np.uint8)[None, :]
    rgb[8:16, 10:30, 2] = 200
    src = Image.fromarray(rgb)
    lossless = fmt in ("PNG", "BMP", "TIFF")
    data = _encode(src, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    img = decode_image(data)
    assert img.size == (40, 24)
    back = np.asarray(img.convert("RGB"), dtype=np.int16)
    if lossless or fmt == "WEBP":
        assert np.array_equal(back, rgb)
    elif fmt == "JPEG":
        assert np.abs(back - rgb).mean() < 8
    else:  # GIF: palette quantisation
        assert np.abs(back - rgb).mean() < 24


def test_gif_first_frame_and_path_input(tmp_path):
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50)
    img = decode_image(p)
    assert np.asarray(img.convert("L")).mean() == pytest.approx(10, abs=1)


def test_exif_orientation_is_applied():
    src = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = src.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = decode_image(_encode(src, "JPEG", exif=exif))
    assert img.size == (10, 20)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"%PDF-1.4 fake"],
    ids=["empty", "text", "broken-png-header", "pdf"],
)
def test_corrupt_bytes_raise_image_error(data):
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert "\n" not in str(e.value)


def test_truncated_png_and_jpeg_raise_image_error():
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = _encode(src, fmt)
        with pytest.raises(ImageError, match="truncated|corrupt"):
            decode_image(data[: len(data) // 2])


def test_other_formats_are_refused():
    data = _encode(Image.new("RGB", (4, 4)), "PPM")
    with pytest.raises(ImageError, match="not a PNG, JPEG"):
        decode_image(data)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused():
    with pytest.raises(ImageError, match="too large"):
        decode_image(_png_header_only(50000, 50000))
    small_file = _encode(Image.new("1", (3000, 3000)), "PNG")  # 9 Mpx, a few kB
    assert len(small_file) < 10_000
    with pytest.raises(ImageError, match="too large"):
        decode_image(small_file, max_pixels=1_000_000)
    big = decode_image(small_file)  # within the limit: decoded, and brought down to the working size at once
    assert big.size == (WORKING_SIDE, WORKING_SIDE) and big.info["original_size"] == (3000, 3000)
    assert decode_image(small_file, working_side=4000).size == (3000, 3000)


@pytest.mark.parametrize("fmt, mode", [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "I;16"), ("GIF", "L")])
def test_large_images_are_decoded_at_working_size_and_keep_their_look(fmt, mode):
    yy, xx = np.mgrid[:2400, :3000]
    gray = (255 * ((xx // 300 + yy // 300) % 2)).astype(np.uint8)  # a 10x8 checkerboard of 300-pixel squares
    image = Image.fromarray(gray).convert(mode) if mode != "I;16" else Image.fromarray(gray.astype(np.uint16) * 257)
    small = decode_image(_encode(image, fmt), working_side=1000)
    assert max(small.size) <= 1000 and small.info["original_size"] == (3000, 2400)
    ref = preprocess(image, (1, 32, 32), invert=False).array.astype(int)
    got = preprocess(small, (1, 32, 32), invert=False)
    assert np.abs(got.array.astype(int) - ref).mean() < 6  # same picture at the model's size
    assert "3000x2400 (decoded at" in got.steps[1][0]


def test_fifo_and_devices_are_refused_not_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        decode_image(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        decode_image("/dev/zero")


def test_auto_inversion_of_dark_digit_on_white():
    light_on_dark = _digit(28, fg=255, bg=0)
    photo = Image.fromarray(255 - light_on_dark).resize((112, 112), Image.Resampling.NEAREST)
    out = preprocess(photo, (1, 28, 28))
    assert isinstance(out, Preprocessed)
    assert out.inverted
    assert out.array.shape == (28, 28) and out.array.dtype == np.uint8
    assert np.abs(out.array.astype(int) - light_on_dark).mean() < 4
    names = [n for n, _ in out.steps]
    assert names[0].startswith("mode") and "invert" in names[2] and names[-1].startswith("final")

    kept = preprocess(Image.fromarray(light_on_dark), (1, 28, 28))
    assert not kept.inverted and np.array_equal(kept.array, light_on_dark)
    forced = preprocess(Image.fromarray(light_on_dark), (1, 28, 28), invert=True)
    assert forced.inverted and np.array_equal(forced.array, 255 - light_on_dark)
    never = preprocess(photo, (1, 28, 28), invert=False)
    assert not never.inverted
    rgb = preprocess(photo.convert("RGB"), (3, 32, 32))  # RGB models are never auto-inverted
    assert not rgb.inverted and rgb.array.shape == (32, 32, 3)
    with pytest.raises(ValueError):
        preprocess(photo, (1, 28, 28), invert="sometimes")


def test_rgba_transparency_is_composited_by_content():
    digit = _digit(28)
    white_ink = np.zeros((28, 28, 4), np.uint8)
    white_ink[..., :3] = 255
    white_ink[..., 3] = digit  # opaque only where the stroke is
    out = preprocess(Image.fromarray(white_ink, "RGBA"), (1, 28, 28))
    assert "over black" in out.steps[0][0] and not out.inverted
    assert np.array_equal(out.array, digit)

    black_ink = white_ink.copy()
    black_ink[..., :3] = 0  # a black pen on a transparent canvas: white background, then inverted
    out = preprocess(Image.fromarray(black_ink, "RGBA"), (1, 28, 28))
    assert "over white" in out.steps[0][0] and out.inverted
    assert np.array_equal(out.array, digit)

    forced = preprocess(Image.fromarray(black_ink, "RGBA"), (1, 28, 28), background="black")
    assert forced.array.max() == 0  # invisible, as asked


def test_modes_fit_and_shapes():
    wide = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (32, 1)))  # 64x32 gradient
    crop = preprocess(wide, (1, 16, 16), fit="crop")
    assert crop.array.shape == (16, 16)
    assert 64 < crop.array.mean() < 192  # the centre of the gradient
    pad = preprocess(wide, (1, 16, 16), fit="pad")
    assert pad.array.shape == (16, 16)
    assert np.all(pad.array[:4] == pad.array[:4, :1])  # padded rows are constant per column edge colour
    sixteen = Image.fromarray(np.full((10, 10), 65535, np.uint16))
    assert preprocess(sixteen, (1, 10, 10), invert=False).array.min() == 255
    pal = Image.fromarray(_digit(28)).convert("P")
    assert is_grayscale(pal) and not is_grayscale(Image.new("RGB", (2, 2)))
    assert preprocess(pal, (3, 28, 28)).array.shape == (28, 28, 3)
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    assert preprocess(Image.fromarray(rgb), (1, 4, 4), invert=False).array[0, 0] == 85  # channel mean
    with pytest.raises(ValueError):
        preprocess(wide, (2, 16, 16))


def test_load_image_file(tmp_path):
    p = tmp_path / "x.png"
    Image.fromarray(_digit(56)).save(p)
    out = load_image_file(p, (1, 28, 28))
    assert out.array.shape == (28, 28) and out.original.size == (56, 56)
    with pytest.raises(ImageError, match="cannot read"):
        load_image_file(tmp_path / "missing.png", (1, 28, 28))
