"""Untrusted uploads → a correct RGB picture, or a clear refusal; and the geometry that maps CLIP's grid back onto it.

Why this module exists: an upload is attacker-controlled bytes. We decide *before* decoding pixels whether to decode
at all (format allow-list, pixel count, aspect ratio, file size), so a decompression bomb or a 1×100000 strip never
reaches a resize. Then every Pillow mode becomes the RGB a person would expect to see: transparency over white (what
a browser shows), 16-bit levels scaled rather than clipped (Pillow's own ``convert("RGB")`` clips ``I;16`` to 255,
turning most 16-bit photos white), EXIF orientation applied (phones store portraits sideways).

The model sees a *letterboxed* square (the image scaled to fit, padded with the normaliser's mean colour, which is
zero after normalisation); the map for that square is then cropped back to the image's own rectangle. That way the
whole photo is explained at its true aspect ratio, instead of only the centre crop CLIP's processor would keep.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from errors import UserError
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # also Gradio's `max_file_size` in app.py
MAX_PIXELS = 25_000_000  # Pillow's default warns at ~89 MP and only refuses at ~179 MP
MAX_ASPECT_RATIO = 10.0  # beyond this the letterboxed content would cover under a tenth of CLIP's grid
WHITE = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


class ImageRejected(UserError):
    """The upload cannot be used; the message names the limit or the problem."""


def harden_pillow(max_pixels: int = MAX_PIXELS) -> None:
    """Lower Pillow's process-wide decompression-bomb limit, so *any* decode in the server (ours or Gradio's) is bounded.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and raises above twice that; :func:`decode_image` turns both into
    :class:`ImageRejected`. Called once by the app at start-up rather than at import, so importing this module has no
    side effect on other code in the process.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an upload (path or bytes) into an RGB image with EXIF orientation applied, or raise ImageRejected."""
    _check_byte_size(source)
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else Path(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's soft limit becomes a refusal too
        try:
            with Image.open(stream, formats=ALLOWED_FORMATS) as image:
                check_geometry(image.size, max_pixels)
                image.seek(0)  # animated GIF/WEBP: the first frame
                image.load()
                oriented = _apply_exif_orientation(image)
                return to_rgb(oriented)
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
            raise ImageRejected(
                f"This image has too many pixels to process safely; the limit is {limit / 1e6:g} megapixels. "
                "Please upload a smaller version."
            ) from error
        except UnidentifiedImageError as error:
            raise ImageRejected(
                f"This file is not a {_format_list()} image (or it is damaged). Please upload a photo in one of "
                "those formats."
            ) from error
        except (OSError, SyntaxError, EOFError, ValueError) as error:
            raise ImageRejected(f"This image could not be decoded; it looks damaged or truncated ({error}).") from error


def check_geometry(size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> None:
    """Refuse, from the header alone, images that are too large or too elongated to explain meaningfully."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageRejected(f"This image has no pixels ({width}×{height}).")
    if width * height > max_pixels:
        raise ImageRejected(
            f"This image is {width}×{height} = {width * height / 1e6:.1f} megapixels; the limit is "
            f"{max_pixels / 1e6:.0f} megapixels. Please upload a smaller version."
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageRejected(
            f"This image is {width}×{height} (aspect ratio {ratio:.0f}:1); the limit is {MAX_ASPECT_RATIO:.0f}:1, "
            "because CLIP sees a square and a thinner strip would cover too little of it. Crop it and try again."
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB picture a viewer would see for any Pillow mode (alpha over white, 16-bit and float levels scaled).

    - ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion.
    - Any alpha (``LA``, ``PA``, ``RGBA``, ``P``/``L``/``RGB`` with a transparency entry): composited onto white.
    - ``I;16*`` and ``I``: 16-bit levels, 0..65535 → 0..255 (``round(v / 257)``); ``I`` is read as 16-bit because
      that is what Pillow writes it as (a 16-bit PNG) and what 16-bit PNGs decode to in older Pillow versions.
    - ``F``: Pillow's 8-bit scale (as ``convert("L")`` reads it), rounded and clipped; NaN → 0.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy()
    if mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float64)
        return _gray_to_rgb(np.clip(levels, 0, 65535) / 257.0)
    if mode == "F":
        levels = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        return _gray_to_rgb(np.clip(levels, 0, 255))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _over_white(image.convert("RGBA"))
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageRejected(f"Images with pixel mode {mode!r} are not supported.") from error


def _gray_to_rgb(levels: np.ndarray) -> Image.Image:
    """8-bit-scale float levels [H, W] → RGB."""
    gray = np.rint(levels).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _over_white(rgba: Image.Image) -> Image.Image:
    """Composite onto white, as a browser shows a transparent image on a white page."""
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says; a broken EXIF block is ignored rather than failing the upload."""
    try:
        return ImageOps.exif_transpose(image)
    except (ValueError, TypeError, SyntaxError, OSError, KeyError, ZeroDivisionError):
        return image


def _check_byte_size(source: str | os.PathLike | bytes) -> None:
    try:
        size = len(source) if isinstance(source, bytes | bytearray) else os.path.getsize(source)
    except FileNotFoundError as error:  # e.g. the upload outlived the cache lifetime (CLIPVIZ_CACHE_SECONDS)
        raise ImageRejected(
            "The uploaded image is no longer on the server (uploads are kept for a limited time). Please upload it "
            "again."
        ) from error
    if size > MAX_UPLOAD_BYTES:
        raise ImageRejected(
            f"This file is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 2**20:.0f} MB. "
            "Please upload a smaller image."
        )


def _format_list() -> str:
    return ", ".join(ALLOWED_FORMATS[:-1]) + " or " + ALLOWED_FORMATS[-1]


# ---- geometry: the letterboxed square CLIP sees, and back ----


@dataclass(frozen=True)
class Letterbox:
    """Where the image sits inside the model's square input, as fractions of the square's side."""

    left: float
    top: float
    right: float
    bottom: float


def letterbox(image: Image.Image, side: int, fill: tuple[int, int, int]) -> tuple[Image.Image, Letterbox]:
    """Scale ``image`` to fit a ``side``×``side`` square (aspect kept, bicubic) and pad it with ``fill``, centred.

    Returns the square and the content's box. The content keeps at least one pixel on each axis.
    """
    width, height = image.size
    scale = side / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    canvas = Image.new("RGB", (side, side), fill)
    left, top = (side - new_w) // 2, (side - new_h) // 2
    canvas.paste(resized, (left, top))
    box = Letterbox(left / side, top / side, (left + new_w) / side, (top + new_h) / side)
    return canvas, box


def normalize(square: Image.Image, mean, std) -> np.ndarray:
    """[3, H, W] float32 pixel values: rescale to [0, 1], then (x - mean) / std per channel, as CLIP's processor does."""
    pixels = np.asarray(square, dtype=np.float32) / 255.0  # [H, W, 3]
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def mean_fill(mean) -> tuple[int, int, int]:
    """The 8-bit colour that normalises to (about) zero: padding that carries no signal."""
    return tuple(int(round(channel * 255)) for channel in mean)


def display_size(size: tuple[int, int], longest: int, shortest_min: int = 1) -> tuple[int, int]:
    """(width, height) with the long side equal to ``longest`` and the aspect ratio kept."""
    width, height = size
    scale = longest / max(width, height)
    return max(shortest_min, round(width * scale)), max(shortest_min, round(height * scale))


def map_on_image(grid_map: np.ndarray, box: Letterbox, size: tuple[int, int]) -> np.ndarray:
    """Upsample a map of the letterboxed square (bilinear) and crop it to the image: [height, width] for ``size``.

    The square is upsampled to the resolution at which the content box has ``size`` pixels, so the crop lands on
    whole pixels and the result is exactly ``size``; values are rescaled to max 1 within the image.
    """
    import torch
    import torch.nn.functional as F

    width, height = size
    square_w = max(width, round(width / (box.right - box.left)))
    square_h = max(height, round(height / (box.bottom - box.top)))
    grid = torch.as_tensor(np.asarray(grid_map, dtype=np.float32))[None, None]  # [1, 1, gh, gw]
    up = F.interpolate(grid, size=(square_h, square_w), mode="bilinear", align_corners=False)[0, 0]
    left = min(round(box.left * square_w), square_w - width)
    top = min(round(box.top * square_h), square_h - height)
    crop = up[top : top + height, left : left + width].clamp_min(0).numpy()
    peak = float(crop.max()) if crop.size else 0.0
    return crop / peak if peak > 0 else crop
