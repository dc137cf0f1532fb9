"""Decoding and preprocessing of user images, in one place for the CLI ``score`` command, the app and
``folder:`` datasets.

A model sees a uint8 image of its ``[C, H, W]`` shape. Getting there from an arbitrary upload takes a few
decisions, each recorded as a step in :class:`Preprocessed` so the app can show what the model was given:

1. **decode** (:func:`decode_image`): PNG, JPEG, GIF (first frame), BMP, WebP and TIFF only; empty,
   truncated and corrupt files, and images over :data:`MAX_PIXELS` (decompression bombs), raise
   :class:`ImageError` with one clear line. EXIF orientation is applied, as a phone photo is meant to be seen.
2. **mode** (``L`` for C = 1, ``RGB`` for C = 3). RGB -> gray averages the three channels (rounded), the
   same rule as :func:`flowcore.data.datasets.match_shape`, so a photo and a dataset image are treated alike.
   16-bit images are scaled (65535 -> 255), not clipped. Transparent regions are composited onto a
   background: black by default (MNIST-style data is light-on-dark), but white when the opaque content is
   itself dark (a black pen stroke on a transparent canvas would otherwise vanish); step 4 then fixes the
   polarity. ``background="black"|"white"`` forces the choice.
3. **fit**: ``fit="crop"`` scales the shorter side to the target and crops the centre (nothing is
   squashed); ``fit="pad"`` scales the longer side to the target and pads with the border colour. Lanczos.
4. **invert**: ``invert="auto"`` inverts gray images (C = 1: the MNIST-family models, which are
   light-on-dark) whose border is brighter than 127, i.e. dark-on-light photos of a digit or a garment on
   paper. RGB images are never auto-inverted. ``True``/``False`` force it.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_BYTES",
    "MAX_PIXELS",
    "MAX_JPEG_SCANS",
    "MAX_WEBP_PIXELS",
    "ImageError",
    "Preprocessed",
    "IMAGE_SUFFIXES",
    "decode_image",
    "display_path",
    "gray_from_rgb",
    "find_image_files",
    "is_grayscale",
    "load_image_file",
    "encode_png",
    "thumbnail",
    "perturb",
    "preprocess",
]

# Larger images are refused: more than any camera's photo (8000x8000 = 64 MP passes), far less than a bomb's
# RAM. What a large image costs is bounded by WORKING_SIDE, not by this: see decode_image.
MAX_PIXELS = 80_000_000
MAX_WEBP_PIXELS = 16_000_000  # 4000 x 4000: see decode_image
MAX_JPEG_SCANS = 200  # libjpeg's progressive script has 10 scans; 200 leaves room for any encoder's
# Decoded images are brought down to at most this many pixels on their longer side straight away (JPEG decodes
# at 1/2, 1/4 or 1/8 scale directly): a model sees 32x32 at most and the app shows a thumbnail, so a 64 MP
# upload costs a few MB of working memory instead of gigabytes of full-size copies.
WORKING_SIDE = 2048
MAX_BYTES = 64 * 1024 * 1024
# Pillow plugins we let parse untrusted bytes (the JPEG plugin also opens camera MPO files).
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
# File name endings of those formats: what a folder is searched for, and what the app's uploader accepts.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_FORMAT_NAMES = "PNG, JPEG, GIF, BMP, WebP or TIFF"

_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
WIDE_SOURCE_MODE = "flowcore_wide_source_mode"  # info key: the mode a reduced wide image was decoded in
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_INVERT_WORDS = {
    "auto": "auto",
    "true": True,
    "yes": True,
    "always": True,
    "on": True,
    "false": False,
    "no": False,
    "never": False,
    "off": False,
}


class ImageError(ValueError):
    """An input is not a usable image; the message is one line that says why (shown as is to users)."""


@dataclass
class Preprocessed:
    """What a model is given and how it got there (each step's image, for display)."""

    original: Image.Image
    steps: list[tuple[str, np.ndarray]] = field(default_factory=list)
    array: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    inverted: bool = False


def decode_image(
    data: bytes | bytearray | memoryview | str | os.PathLike,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    working_side: int = WORKING_SIDE,
) -> Image.Image:
    """Decode untrusted image bytes (or a file) fully, so every failure surfaces here as :class:`ImageError`.

    Returns a loaded, EXIF-oriented Pillow image (first frame of animations) in its own mode, at most
    ``working_side`` pixels on its longer side (larger ones are reduced while decoding; ``info["original_size"]``
    keeps the file's own size).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        label, raw = "image", bytes(data)
    else:
        path = Path(data)
        label = path.name or str(path)
        try:
            if path.exists() and not path.is_file():  # a FIFO or device would block or never end
                raise ImageError(f"{label}: not a regular file")
            if path.stat().st_size > max_bytes:
                raise ImageError(f"{label}: file is larger than {max_bytes // (1024 * 1024)} MiB")
            raw = path.read_bytes()
        except OSError as e:
            raise ImageError(f"{label}: cannot read file ({e.strerror or e})") from e
    if not raw:
        raise ImageError(f"{label}: empty file, not an image")
    if len(raw) > max_bytes:
        raise ImageError(f"{label}: file is larger than {max_bytes // (1024 * 1024)} MiB")
    bomb = f"{label}: image too large (over {max_pixels:,} pixels); refusing a possible decompression bomb"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
        except UnidentifiedImageError as e:
            raise ImageError(f"{label}: not a {_FORMAT_NAMES} image") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(bomb) from e
        except Exception as e:  # Pillow raises many types on malformed headers
            raise ImageError(f"{label}: corrupt image header ({_short(e)})") from e
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{label}: image has no pixels ({w}x{h})")
        if w * h > max_pixels:
            raise ImageError(bomb)
        if img.format == "WEBP" and w * h > min(max_pixels, MAX_WEBP_PIXELS):
            # WebP has no reduced-scale decode and Pillow's decoder holds ~15 bytes a pixel at its peak
            # (benchmarks/upload_memory.py): past this size one upload would add more than ~250 MB
            raise ImageError(f"{label}: a WebP image is decoded whole, so at most {MAX_WEBP_PIXELS:,} pixels are "
                             f"accepted ({w}x{h} has {w * h:,}); save it smaller or as PNG/JPEG")
        if img.format == "JPEG":
            # each scan of a progressive JPEG is decoded over the whole image: a file repeating one scan hundreds
            # of thousands of times decodes for most of an hour. 0xFF 0xDA (start of scan) cannot occur inside
            # entropy-coded data (an 0xFF there is followed by 0x00 or a restart marker), so this counts scans.
            scans = raw.count(b"\xff\xda")
            if scans > MAX_JPEG_SCANS:
                raise ImageError(f"{label}: a JPEG of {scans:,} scans (an ordinary one has at most a few dozen); "
                                 "refusing a decode that could take minutes")
        try:
            if img.format == "JPEG" and max(w, h) > working_side:
                img.draft(None, (working_side, working_side))  # decode at 1/2, 1/4 or 1/8 scale directly
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(bomb) from e
        except Exception as e:
            raise ImageError(f"{label}: truncated or corrupt {img.format} image ({_short(e)})") from e
    fmt = img.format
    if max(img.size) > working_side:
        img = _shrink(img, working_side)
    try:
        oriented = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the user the image
        oriented = None
    out = (oriented if oriented is not None else img).copy()
    out.format = fmt
    if max(w, h) > working_side:
        out.info["original_size"] = (w, h)  # as stored in the file (before any EXIF rotation)
    return out


def is_grayscale(image: Image.Image) -> bool:
    """True for single-channel modes and palettes whose colours are all gray (used to pick C for folders)."""
    if image.mode in _GRAY_MODES:
        return True
    if image.mode in ("P", "PA"):
        pal = image.getpalette() or []
        rgb = np.asarray(pal[: len(pal) - len(pal) % 3], dtype=np.int32).reshape(-1, 3)
        return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))
    return False


def preprocess(
    image: Image.Image,
    image_shape: tuple[int, int, int] | list[int] = (1, 28, 28),
    invert: bool | str = "auto",
    fit: str = "crop",
    background: str = "auto",
) -> Preprocessed:
    """Bring a decoded image to a model's ``[C, H, W]`` uint8 input, recording every step (see module doc).

    ``array`` is (H, W) for C = 1 and (H, W, 3) for C = 3.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess needs a PIL image, got {type(image).__name__}")
    c, h, w = (int(v) for v in image_shape)
    if c not in (1, 3) or h < 1 or w < 1:
        raise ValueError(f"image_shape must be [1 or 3, H, W], got {list(image_shape)}")
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
    if background not in ("auto", "black", "white"):
        raise ValueError(f"background must be 'auto', 'black' or 'white', got {background!r}")
    inv = _parse_invert(invert)

    steps: list[tuple[str, np.ndarray]] = []
    converted, note = _convert(image, "L" if c == 1 else "RGB", background)
    steps.append((f"mode {image.mode} -> {converted.mode}{note}", np.asarray(converted).copy()))

    fitted = _fit(converted, w, h, fit)
    verb = "scale and centre-crop" if fit == "crop" else "scale and pad"
    size = f"{image.width}x{image.height}"
    if "original_size" in image.info:
        size = "{}x{} (decoded at {})".format(*image.info["original_size"], size)
    steps.append((f"{verb} {size} -> {w}x{h} (Lanczos)", np.asarray(fitted).copy()))

    arr = np.array(fitted, dtype=np.uint8)
    border = _border_mean(arr)
    do_invert = inv is True or (inv == "auto" and c == 1 and border > 127)
    if do_invert:
        arr = 255 - arr
        why = "forced" if inv is True else f"auto: border mean {border:.0f} > 127, dark-on-light"
        steps.append((f"invert ({why})", arr.copy()))
    steps.append((f"final {h}x{w}x{c} uint8", arr))
    return Preprocessed(original=image, steps=steps, array=arr, inverted=bool(do_invert))


def find_image_files(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given, folders expanded recursively to their image files (sorted), and ``(path, reason)``
    for every given path or subfolder that could not be searched: nothing is skipped without a word."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for p in map(Path, paths):
        if not p.is_dir():
            files.append(p)  # a missing or unreadable file is reported when it is decoded
            continue

        def unreadable(e: OSError, folder: Path = p) -> None:
            problems.append((display_path(e.filename or folder), f"cannot list folder ({e.strerror or e})"))

        found = []
        for root, dirs, names in os.walk(p, onerror=unreadable):
            dirs.sort()
            found += [Path(root) / n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        files += sorted(f for f in found if f.is_file())
    return files, problems


def display_path(path: str | os.PathLike) -> str:
    """A path as printable text: bytes that are not UTF-8 in a file name are shown as backslash escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_image_file(
    path: str | os.PathLike,
    image_shape: tuple[int, int, int] | list[int],
    invert: bool | str = "auto",
    fit: str = "crop",
) -> Preprocessed:
    """Decode and preprocess one file: what ``flowcore score`` does for each path it is given."""
    return preprocess(decode_image(path), image_shape, invert=invert, fit=fit)


# ------------------------------------------------------------------------------ display and edits


def encode_png(array: np.ndarray) -> bytes:
    """uint8 ``(H, W)`` / ``(H, W, 3)`` -> PNG bytes (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def thumbnail(array: np.ndarray, size: int = 256) -> np.ndarray:
    """Downscale a large image for display to ``size`` pixels; small ones are enlarged with square pixels."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    h, w = a.shape[:2]
    img = Image.fromarray(a)
    if max(h, w) > size:
        scale = size / max(h, w)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    elif max(h, w) < size // 2:
        k = max(1, (size // 2) // max(h, w))
        img = img.resize((w * k, h * k), Image.Resampling.NEAREST)
    return np.asarray(img)


def perturb(
    image: np.ndarray,
    noise: float = 0.0,
    brightness: float = 0.0,
    contrast: float = 1.0,
    blur: float = 0.0,
    invert: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Edit a uint8 image: Gaussian blur (radius in pixels), contrast about mid-grey, brightness offset,
    Gaussian pixel noise (std in grey levels), then inversion; rounded and clipped back to uint8."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"perturb needs a uint8 image, got {a.dtype}")
    if blur > 0:
        a = np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius=float(blur))))
    x = a.astype(np.float64)
    x = (x - 127.5) * float(contrast) + 127.5 + float(brightness)
    if noise > 0:
        x = x + np.random.default_rng(seed).normal(0.0, float(noise), size=x.shape)
    out = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return 255 - out if invert else out


# --------------------------------------------------------------------------------------------- helpers


def _shrink(img: Image.Image, working_side: int) -> Image.Image:
    """A loaded image reduced by a whole factor (box average) to at most ``working_side`` on its longer side,
    without a full-size copy: Pillow's own reduce premultiplies an alpha image into one, so those are reduced
    band by band."""
    factor = math.ceil(max(img.size) / working_side)
    info = dict(img.info)
    if img.mode in _WIDE_MODES:  # Pillow's reduce takes no 16-bit or float image: block means, a strip at a time
        w, h = img.size
        rows = []
        cols = -(-w // factor) * factor
        counts = np.zeros(cols)
        counts[:w] = 1.0
        counts = counts.reshape(-1, factor).sum(axis=1)  # the last block may be narrower
        for top in range(0, h, factor):
            strip = np.asarray(img.crop((0, top, w, min(top + factor, h))), dtype=np.float64)
            bad = int(np.count_nonzero(~np.isfinite(strip)))
            if bad:  # a mean would hide them: refused here as the full-size rule would (wide_to_gray_levels)
                raise ImageError(f"{bad:,} pixel value(s) are not finite (NaN or infinite): refused rather than "
                                 "guessed")
            padded = np.zeros((strip.shape[0], cols))
            padded[:, :w] = strip
            sums = padded.reshape(strip.shape[0], -1, factor).sum(axis=(0, 2))
            rows.append(sums / (counts * strip.shape[0]))
        out = Image.fromarray(np.asarray(rows, dtype=np.float32), "F")
        info.setdefault(WIDE_SOURCE_MODE, img.mode)
        out.info = info
        return out
    if img.mode in ("RGBA", "LA"):
        out = Image.merge(img.mode, [img.getchannel(i).reduce(factor) for i in range(len(img.getbands()))])
    else:
        try:
            out = img.reduce(factor)
        except ValueError:  # modes reduce does not take (palette, 1-bit): a nearest-neighbour thumbnail
            out = img.copy() if img.mode not in ("P", "1") else img
            out.thumbnail((working_side, working_side))
    out.info = info
    return out


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:120]


def _parse_invert(invert: bool | str) -> bool | str:
    if isinstance(invert, (bool, np.bool_)):
        return bool(invert)
    if isinstance(invert, str) and invert.strip().lower() in _INVERT_WORDS:
        return _INVERT_WORDS[invert.strip().lower()]
    raise ValueError(f"invert must be True, False or 'auto', got {invert!r}")


def gray_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """The project's one RGB -> gray rule (uploads and the cross-domain rule of
    :func:`flowcore.data.datasets.match_shape`): the mean of the three channels, rounded."""
    return np.round(np.asarray(rgb).astype(np.float32).mean(axis=-1)).astype(np.uint8)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


FLOAT_MIN_SHARE_ABOVE_ONE = 0.01  # a float image is read as 0..255 only when at least 1 % of its pixels exceed 1


def wide_to_gray_levels(a: np.ndarray, mode: str) -> tuple[np.ndarray, str]:
    """The one rule for pixels wider than 8 bits (float, 16- and 32-bit integer images): their values as 0..255
    gray levels (float64) and a note saying what was done, or an :class:`ImageError` where the scale cannot be
    known. Never a silent guess:

    - a pixel that is NaN or infinite, or below 0, refuses the image;
    - 16-bit images (``I;16*``): 65535 -> 255;
    - 32-bit integer images (``I``): read as 8-bit when every value is <= 255, as 16-bit when <= 65535, else refused;
    - float images (``F``): read as 0..1 when every value is <= 1; as 0..255 when every value is <= 255 and at
      least 1 % of the pixels exceed 1 (a few stray values above 1 in a 0..1 image would otherwise turn it black);
      anything else is refused."""
    a = np.asarray(a, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad:
        raise ImageError(f"{bad:,} pixel value(s) are not finite (NaN or infinite): refused rather than guessed")
    if a.size == 0:
        raise ImageError("the image has no pixels")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0:
        raise ImageError(f"pixel values go below 0 (min {lo:g}); images are read as 0..1, 0..255 or 0..65535")
    if mode.startswith("I;16"):
        return a / 257.0, " (16-bit scaled: 65535 -> 255)"
    if mode == "I":
        if hi <= 255:
            return a, " (32-bit integers, all <= 255: read as 8-bit)"
        if hi <= 65535:
            return a / 257.0, " (32-bit integers, all <= 65535: read as 16-bit, 65535 -> 255)"
        raise ImageError(f"32-bit integer pixels up to {hi:g}: beyond 16 bits, their scale is unknown; refused")
    if hi <= 1.0:
        return a * 255.0, " (float 0..1 scaled to 0..255)"
    share = float(np.mean(a > 1.0))
    if hi <= 255.0 and share >= FLOAT_MIN_SHARE_ABOVE_ONE:
        return a, " (float read as 0..255)"
    if hi <= 255.0:
        raise ImageError(f"float pixels are in 0..1 except {share:.2%} of them (max {hi:g}): is it 0..1 or 0..255? "
                         "Refused rather than guessed; clip it to 0..1 or save it as 8-bit")
    raise ImageError(f"float pixels up to {hi:g}: not 0..1 or 0..255; refused rather than guessed")


def _convert(image: Image.Image, target: str, background: str) -> tuple[Image.Image, str]:
    note = ""
    if image.mode in _WIDE_MODES:
        # a large wide image was reduced to float block means by _shrink: its rule is its source's
        levels, note = wide_to_gray_levels(np.asarray(image), image.info.get(WIDE_SOURCE_MODE, image.mode))
        rgb = np.repeat(np.clip(np.round(levels), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    elif _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
        alpha = rgba[..., 3:] / 255.0
        colour = rgba[..., :3]
        bg = 0.0
        if background == "white":
            bg = 255.0
        elif background == "auto":
            opaque = alpha[..., 0] > 0.5
            if opaque.any() and float(colour[opaque].mean()) < 128.0:
                bg = 255.0
        rgb = np.round(colour * alpha + bg * (1.0 - alpha)).astype(np.uint8)
        note = f" (transparency over {'white' if bg else 'black'})"
    elif target == "L" and image.mode in ("1", "L"):
        return image.convert("L"), ""
    else:
        rgb = np.asarray(image.convert("RGB"))
    if target == "L":
        if note == "" and image.mode not in _GRAY_MODES:
            note = " (mean of R, G, B)"
        return Image.fromarray(gray_from_rgb(rgb), "L"), note
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB"), note


def _fit(image: Image.Image, w: int, h: int, fit: str) -> Image.Image:
    w0, h0 = image.size
    if (w0, h0) == (w, h):
        return image.copy()
    lanczos = Image.Resampling.LANCZOS
    if fit == "crop":
        if w0 * h > h0 * w:  # wider than the target: crop the sides
            cw = h0 * w / h
            box = ((w0 - cw) / 2, 0.0, (w0 + cw) / 2, float(h0))
        else:
            ch = w0 * h / w
            box = (0.0, (h0 - ch) / 2, float(w0), (h0 + ch) / 2)
        return image.resize((w, h), lanczos, box=box)
    scale = min(w / w0, h / h0)
    nw, nh = max(1, min(w, round(w0 * scale))), max(1, min(h, round(h0 * scale)))
    small = image.resize((nw, nh), lanczos)
    arr = np.asarray(small)
    ring = np.concatenate(
        [
            arr[0].reshape(-1, *arr.shape[2:]),
            arr[-1].reshape(-1, *arr.shape[2:]),
            arr[:, 0].reshape(-1, *arr.shape[2:]),
            arr[:, -1].reshape(-1, *arr.shape[2:]),
        ]
    )
    fill = np.median(ring, axis=0)
    colour = int(round(float(fill))) if image.mode == "L" else tuple(int(round(float(v))) for v in fill)
    canvas = Image.new(image.mode, (w, h), colour)
    canvas.paste(small, ((w - nw) // 2, (h - nh) // 2))
    return canvas


def _border_mean(arr: np.ndarray) -> float:
    h, w = arr.shape[:2]
    b = max(1, min(h, w) // 14)
    mask = np.ones((h, w), dtype=bool)
    mask[b : h - b, b : w - b] = False
    return float(arr[mask].mean())
