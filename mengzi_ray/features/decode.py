"""Image bytes → RGB uint8 array at original size: EXIF orientation applied, any mode converted, pixel limit enforced.

Called once per input row by the extraction job's decode tasks and by the serving ingress; a failure raises
:class:`DecodeError` (a ValueError) whose message says what is wrong with the bytes, never a PIL-internal trace.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# The VinVL extraction resizes to at most 1000 px on the long side; 64 MP leaves room for any photo camera while a
# decompression bomb (a tiny file that expands to gigabytes) is refused before its pixels are allocated.
DEFAULT_MAX_PIXELS = 64_000_000

# Transparent pixels carry no defined colour; they are composited on white, as a browser would show them.
_BACKGROUND = (255, 255, 255)


class DecodeError(ValueError):
    """The bytes are not a decodable image, or it exceeds the pixel limit."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open, check the declared size against max_pixels, then load the pixels (so truncation shows up here)."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # PIL warns (and past 2x its own limit raises) for large images; our own limit below is the policy.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise DecodeError(f"image exceeds the pixel limit ({exc})") from None
        except Exception as exc:  # PIL raises many types for garbage bytes; all mean "not an image"
            raise DecodeError(f"not a recognised image format ({len(data)} bytes): {exc}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError(
                f"image of {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
                "(decompression-bomb guard)"
            )
        if width == 0 or height == 0:
            raise DecodeError(f"image has an empty size {width}x{height}")
        try:
            image.load()
        except Exception as exc:
            raise DecodeError(f"corrupt or truncated {image.format} image data: {exc}") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: 16/32-bit and float grey scaled to 8 bits, alpha composited on white, CMYK/P/L/YCbCr
    converted."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit PNGs (the common case) span 0..65535; a float or 32-bit image that stays within 8 bits is kept.
        scale = 257.0 if values.max(initial=0.0) > 255.0 else 1.0
        grey = np.clip(np.round(values / scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, exif_orientation: bool = True) -> np.ndarray:
    """Encoded image bytes → (H, W, 3) uint8 RGB at original resolution.

    exif_orientation=True (our detectors): upright (EXIF orientation applied), any mode converted as _to_rgb says.
    False: the pixels as stored, converted with PIL's plain ``convert("RGB")`` (alpha dropped), exactly as
    scene_graph_benchmark's datasets load images (data/datasets/utils/image_ops.py img_from_base64), so an
    imported VinVL detector sees what the original saw.
    Multi-frame files (GIF, TIFF) give their first frame. Raises DecodeError for empty, unrecognised, truncated or
    corrupt data and for images with more than `max_pixels` pixels (checked before pixel data is decoded).
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    image = _open(data, max_pixels)
    if not exif_orientation:
        try:
            rgb = image.convert("RGB")
        except Exception as exc:
            raise DecodeError(f"cannot convert {image.mode} image to RGB: {exc}") from None
        return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise DecodeError(f"cannot apply EXIF orientation: {exc}") from None
    rgb = _to_rgb(upright if upright is not None else image)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
