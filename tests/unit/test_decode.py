"""decode_image: every PIL mode → upright RGB uint8 at original size; bad bytes → DecodeError with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mengzi_ray.features.decode import DecodeError, decode_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def gradient(width: int = 40, height: int = 30) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return np.stack([x, y, 255 - x], axis=-1)


@pytest.mark.parametrize(
    "mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("CMYK", "JPEG"), ("P", "GIF"), ("LA", "PNG"), ("YCbCr", "JPEG"),
                 ("1", "PNG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "TIFF")]
)
def test_any_mode_decodes_to_rgb_uint8(mode: str, fmt: str) -> None:
    image = decode_image(encode(Image.fromarray(gradient()).convert(mode), fmt))
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8


def test_png_is_exact_and_grey_is_replicated() -> None:
    rgb = gradient()
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(rgb), "PNG")), rgb)
    grey = decode_image(encode(Image.fromarray(rgb[:, :, 0]), "PNG"))
    np.testing.assert_array_equal(grey, np.repeat(rgb[:, :, :1], 3, axis=2))


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(values).convert("I;16"), "PNG"))
    np.testing.assert_array_equal(image[0, :, 0], [0, 100, 255])


def test_sixteen_bit_scaling_in_integers_equals_rounding_every_value() -> None:
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once
    image = decode_image(encode(Image.fromarray(values).convert("I;16"), "PNG"))
    expected = np.clip(np.round(values.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(image[:, :, 0], expected)
    signed = np.array([[-300, 0, 200, 70000]], dtype=np.int32)  # 32-bit "I": negative and beyond 16 bits clip
    image = decode_image(encode(Image.fromarray(signed, "I"), "TIFF"))
    np.testing.assert_array_equal(image[0, :, 0], np.clip(np.round(signed[0] / 257.0), 0, 255).astype(np.uint8))


def test_transparency_is_composited_on_white() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [255, 0, 0, 255]  # opaque red; the rest fully transparent black
    image = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert image[0, 0].tolist() == [255, 0, 0] and image[1, 1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied() -> None:
    rgb = gradient(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90° clockwise
    image = decode_image(encode(Image.fromarray(rgb), "PNG", exif=exif))
    assert image.shape == (40, 30, 3)
    np.testing.assert_array_equal(image, np.rot90(rgb, k=-1))


def test_scene_graph_benchmark_decoding_ignores_exif_and_drops_alpha() -> None:
    rgb = gradient(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = decode_image(encode(Image.fromarray(rgb), "PNG", exif=exif), exif_orientation=False)
    np.testing.assert_array_equal(stored, rgb)  # as stored, like PIL's open + convert("RGB")
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = [255, 0, 0, 255]
    plain = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), exif_orientation=False)
    assert plain[0, 0].tolist() == [255, 0, 0] and plain[1, 1].tolist() == [0, 0, 0]


def test_first_frame_of_an_animation() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue())[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"hello, not an image\n", "not a recognised image format"),
        (encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8)), "PNG")[:5000],
         "truncated"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "not a recognised image format"),
    ],
)
def test_bad_bytes_raise_decode_error_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_pixel_limit_refuses_before_decoding() -> None:
    bomb = encode(Image.new("L", (3000, 3000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="3000x3000 = 9000000 pixels exceeds max_pixels=1000000"):
        decode_image(bomb, max_pixels=1_000_000)
    assert decode_image(bomb, max_pixels=9_000_000).shape == (3000, 3000, 3)
    assert issubclass(DecodeError, ValueError)
