"""Image bytes → RGB uint8 array at original size: EXIF orientation applied, any mode converted, pixel limit enforced.

Called once per input row by the extraction job's decode tasks and by the serving ingress; a failure raises
:class:`DecodeError` (a ValueError) whose message says what is wrong with the bytes, never a PIL-internal trace.
Also the torchvision_c4 detector's resize rule (`resized_size`, `resize_for_detector`), which the decode tasks
apply before shipping an image to the detector actors (`shipping_size`), so only detector-sized pixels travel.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# The VinVL extraction resizes to at most 1000 px on the long side; 64 MP leaves room for any photo camera while a
# decompression bomb (a tiny file that expands to gigabytes) is refused before its pixels are allocated.
DEFAULT_MAX_PIXELS = 64_000_000

# Transparent pixels carry no defined colour; they are composited on white, as a browser would show them.
_BACKGROUND = (255, 255, 255)


class DecodeError(ValueError):
    """The bytes are not a decodable image, or it exceeds the pixel limit."""


def _open(data: bytes, max_pixels: int, reduce_to: tuple[int, int] | None = None) -> tuple[Image.Image, int]:
    """(image, its stored width before any reduction): open, check the declared size against max_pixels, then load
    the pixels (so truncation shows up here).

    reduce_to: (min_size, max_size) of the consumer's resize: a JPEG at least twice that size is decoded at a
    power-of-two reduction (libjpeg's DCT scaling, `Image.draft`) that stays at or above it."""
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
        if reduce_to is not None and image.format == "JPEG":
            scale = min(reduce_to[0] / min(width, height), reduce_to[1] / max(width, height))
            if scale <= 0.5:
                image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        try:
            image.load()
        except Exception as exc:
            raise DecodeError(f"corrupt or truncated {image.format} image data: {exc}") from None
    return image, width


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: 16/32-bit and float grey scaled to 8 bits, alpha composited on white, CMYK/P/L/YCbCr
    converted."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return Image.fromarray(_grey8(np.asarray(image))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _grey8(values: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit or float grey → uint8: values within 0..255 are kept, wider ones (16-bit PNGs span 0..65535)
    become round(v / 257). Integers stay in integer arithmetic, so a 16 MP 16-bit image never takes a float64 copy."""
    if values.dtype.kind == "f":
        values = np.nan_to_num(values, nan=0.0, posinf=65535.0, neginf=0.0)
        scale = 257.0 if values.max(initial=0.0) > 255.0 else 1.0
        return np.clip(np.round(values / scale), 0, 255).astype(np.uint8)
    wide = values.astype(np.int64 if values.dtype.itemsize >= 4 else np.int32)
    if wide.max(initial=0) > 255:
        # round(v / 257) exactly: v / 257 never ends in .5 (257 is odd), so it is floor((v + 128) / 257)
        wide += 128
        wide //= 257
    return np.clip(wide, 0, 255, out=wide).astype(np.uint8)


@dataclass
class DecodedImage:
    """An image decoded for a consumer that resizes it anyway (a detector): pixels, and original size / their size."""

    pixels: np.ndarray  # (h, w, 3) uint8
    scale: float  # multiply coordinates in `pixels` by this to get original pixels (1.0: not reduced)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, exif_orientation: bool = True) -> np.ndarray:
    """Encoded image bytes → (H, W, 3) uint8 RGB at original resolution.

    exif_orientation=True (our detectors): upright (EXIF orientation applied), any mode converted as _to_rgb says.
    False: the pixels as stored, converted with PIL's plain ``convert("RGB")`` (alpha dropped), exactly as
    scene_graph_benchmark's datasets load images (data/datasets/utils/image_ops.py img_from_base64), so an
    imported VinVL detector sees what the original saw.
    Multi-frame files (GIF, TIFF) give their first frame. Raises DecodeError for empty, unrecognised, truncated or
    corrupt data and for images with more than `max_pixels` pixels (checked before pixel data is decoded).
    """
    return decode_image_for(data, max_pixels, None, exif_orientation=exif_orientation).pixels


def decode_image_for(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: tuple[int, int] | None = None, *,
                     exif_orientation: bool = True) -> DecodedImage:
    """`decode_image` for a consumer that resizes to (min_size, max_size) (the serving ingress, for its detector):
    a JPEG of at least twice that size decodes reduced by 2, 4 or 8 (cheaper by about that factor squared, still
    at least the consumer's size), and `scale` maps its coordinates back to the original. Other formats, smaller
    JPEGs and `reduce_to=None` decode at full size (scale 1.0). Errors as decode_image."""
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    image, stored_width = _open(data, max_pixels, reduce_to)
    scale = stored_width / image.size[0]
    if not exif_orientation:
        try:
            rgb = image.convert("RGB")
        except Exception as exc:
            raise DecodeError(f"cannot convert {image.mode} image to RGB: {exc}") from None
        return DecodedImage(np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)), scale)
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception as exc:
        raise DecodeError(f"cannot apply EXIF orientation: {exc}") from None
    rgb = _to_rgb(upright if upright is not None else image)
    return DecodedImage(np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)), scale)


def resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """maskrcnn_benchmark data/transforms/transforms.py Resize.get_size: (width, height) after resizing, with its
    int() truncation (the torchvision_c4 detector's input size)."""
    size = min_size
    short, long = float(min(width, height)), float(max(width, height))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    if width < height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_for_detector(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """(H, W, 3) uint8 → the image at resized_size, resized as the torchvision_c4 detector does (PIL bilinear on
    the 8-bit image); always a new, writable array."""
    height, width = image.shape[:2]
    size = resized_size(width, height, min_size, max_size)
    if size == (width, height):
        return np.array(image, dtype=np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).resize(size, Image.BILINEAR)
    return np.array(pil, dtype=np.uint8)


def shipping_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size an extraction decode task ships an image at: the detector's input size when the detector would
    not resize that again (then its input is bit-identical to resizing the original), else the original size."""
    target = resized_size(width, height, min_size, max_size)
    return target if resized_size(*target, min_size, max_size) == target else (width, height)
