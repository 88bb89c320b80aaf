"""Tests of shared.imaging.decode: every pixel mode in, upright RGB uint8 out;
bad, truncated and oversized uploads refused with the right code."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from shared.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    ERROR_CODES,
    DecodedImage,
    ImageDecodeError,
    decode_image,
    encode_png,
)

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


# --------------------------------------------------------------------------- #
# Helpers: build files in memory


def save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def raw_png(width: int, height: int, depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG file from an already-compressed IDAT stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_from_rows(width: int, height: int, depth: int, color_type: int, rows: np.ndarray) -> bytes:
    """PNG with filter type 0 from big-endian sample rows ``(height, row_bytes)``."""
    raw = b"".join(b"\x00" + rows[r].tobytes() for r in range(height))
    return raw_png(width, height, depth, color_type, zlib.compress(raw))


def bomb_png(side: int) -> bytes:
    """A real, valid side x side 1-bit all-black PNG (compresses to ~100 KB for 30000)."""
    row = b"\x00" + bytes((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return raw_png(side, side, 1, 0, idat)


def quadrants(w: int = 64, h: int = 32) -> np.ndarray:
    """Asymmetric test picture: TL green, BL red, right half blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = GREEN
    arr[h // 2 :, : w // 2] = RED
    arr[:, w // 2 :] = BLUE
    return arr


def with_orientation(img: Image.Image, fmt: str, orientation: int, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(img, fmt, exif=exif.tobytes(), **kwargs)


def assert_rgb(decoded: DecodedImage, height: int, width: int) -> np.ndarray:
    px = decoded.pixels
    assert isinstance(decoded, DecodedImage)
    assert px.dtype == np.uint8 and px.shape == (height, width, 3)
    assert px.flags.c_contiguous and px.flags.writeable
    assert (decoded.height, decoded.width) == (height, width)
    return px


def close(actual, expected, tol: int = 6) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, int) - np.asarray(expected, int)) <= tol))


def decode_error(data, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    assert info.value.code in ERROR_CODES
    assert str(info.value) == info.value.message and len(info.value.message) > 10
    return info.value


# --------------------------------------------------------------------------- #
# Plain formats


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_rgb_round_trip(fmt):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    decoded = decode_image(save(Image.fromarray(arr), fmt))
    assert decoded.format == fmt
    np.testing.assert_array_equal(assert_rgb(decoded, 13, 17), arr)


def test_jpeg_colours_and_format():
    decoded = decode_image(save(Image.fromarray(quadrants()), "JPEG", quality=95))
    px = assert_rgb(decoded, 32, 64)
    assert decoded.format == "JPEG"
    assert close(px[8, 8], GREEN, 12) and close(px[24, 8], RED, 12) and close(px[16, 48], BLUE, 12)


def test_bytearray_and_memoryview_accepted():
    data = save(Image.new("RGB", (3, 2), RED), "PNG")
    for wrapped in (bytearray(data), memoryview(data)):
        assert (decode_image(wrapped).pixels == RED).all()


def test_one_by_one_image():
    px = assert_rgb(decode_image(save(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")), 1, 1)
    assert px[0, 0].tolist() == [10, 20, 30]


def test_detects_by_content_not_name():
    # A JPEG is a JPEG whatever it is called; decode_image never sees a name.
    decoded = decode_image(save(Image.new("RGB", (8, 8), RED), "JPEG"))
    assert decoded.format == "JPEG"


# --------------------------------------------------------------------------- #
# EXIF orientation


def test_exif_orientation_6_jpeg_is_rotated_clockwise():
    # Stored 64x32 landscape; orientation 6 = display rotated 90 deg clockwise.
    data = with_orientation(Image.fromarray(quadrants()), "JPEG", 6, quality=95)
    assert Image.open(io.BytesIO(data)).size == (64, 32)
    px = assert_rgb(decode_image(data), 64, 32)
    # Stored left column becomes the top row: TL green -> top-right,
    # BL red -> top-left, right half blue -> bottom half.
    assert close(px[8, 24], GREEN, 12)
    assert close(px[8, 8], RED, 12)
    assert close(px[48, 16], BLUE, 12)


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (1, lambda a: a),
        (2, np.fliplr),
        (3, lambda a: np.rot90(a, 2)),
        (4, np.flipud),
        (5, lambda a: np.rot90(np.flipud(a), -1)),  # transpose
        (6, lambda a: np.rot90(a, -1)),  # 90 deg clockwise
        (7, lambda a: np.rot90(np.fliplr(a), -1)),  # transverse
        (8, lambda a: np.rot90(a, 1)),  # 90 deg counter-clockwise
    ],
)
def test_every_exif_orientation_png_exact(orientation, expected):
    rng = np.random.default_rng(orientation)
    arr = rng.integers(0, 256, (5, 9, 3), dtype=np.uint8)
    decoded = decode_image(with_orientation(Image.fromarray(arr), "PNG", orientation))
    want = expected(arr)
    np.testing.assert_array_equal(assert_rgb(decoded, *want.shape[:2]), want)


def test_malformed_exif_is_ignored():
    data = save(Image.new("RGB", (4, 2), RED), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    px = assert_rgb(decode_image(data), 2, 4)
    assert close(px[1, 1], RED, 12)


# --------------------------------------------------------------------------- #
# Pixel modes


def test_grayscale_l():
    arr = np.array([[0, 100, 255]], np.uint8)
    px = assert_rgb(decode_image(save(Image.fromarray(arr), "PNG")), 1, 3)
    assert px[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]


def test_one_bit():
    img = Image.new("1", (4, 1), 0)
    img.putpixel((1, 0), 1)
    img.putpixel((3, 0), 1)
    px = assert_rgb(decode_image(save(img, "PNG")), 1, 4)
    assert px[0].tolist() == [list(BLACK), list(WHITE), list(BLACK), list(WHITE)]


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    data = save(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    px = assert_rgb(decode_image(data), 1, 4)
    assert px[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()


def test_sixteen_bit_rgb_png_is_scaled():
    samples = np.array([[[65535, 0, 0], [0, 65535, 0]], [[0, 0, 65535], [32896, 32896, 32896]]], ">u2")
    data = png_from_rows(2, 2, 16, 2, samples.reshape(2, -1))
    px = assert_rgb(decode_image(data), 2, 2)
    assert px.tolist() == [[list(RED), list(GREEN)], [list(BLUE), [128, 128, 128]]]


def test_thirty_two_bit_int_tiff_is_scaled_as_sixteen_bit():
    values = np.array([[0, 65535, 32896]], np.int32)
    data = save(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    px = assert_rgb(decode_image(data), 1, 3)
    assert px[0, :, 0].tolist() == [0, 255, 128]


def test_float_tiff_in_unit_range_is_scaled():
    values = np.array([[0.0, 0.5, 1.0]], np.float32)
    data = save(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    px = assert_rgb(decode_image(data), 1, 3)
    assert px[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_jpeg():
    data = save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    px = assert_rgb(decode_image(data), 16, 16)
    assert close(px[8, 8], RED, 10)


def test_rgba_transparent_becomes_white_and_opaque_kept():
    arr = np.zeros((1, 3, 4), np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    arr[0, 1] = (255, 0, 0, 255)  # opaque red stays red
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black over white -> mid grey
    px = assert_rgb(decode_image(save(Image.fromarray(arr), "PNG")), 1, 3)
    assert px[0, 0].tolist() == list(WHITE)
    assert px[0, 1].tolist() == list(RED)
    assert close(px[0, 2], (127, 127, 127), 2)


def test_la_transparent_becomes_white():
    img = Image.new("LA", (2, 1), (0, 0))
    img.putpixel((1, 0), (50, 255))
    px = assert_rgb(decode_image(save(img, "PNG")), 1, 2)
    assert px[0].tolist() == [list(WHITE), [50, 50, 50]]


def test_palette_image_colours():
    img = Image.new("P", (3, 1))
    img.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 * 3 - 9))
    for x in range(3):
        img.putpixel((x, 0), x)
    px = assert_rgb(decode_image(save(img, "PNG")), 1, 3)
    assert px[0].tolist() == [list(RED), list(GREEN), list(BLUE)]


def test_palette_with_transparency_index_becomes_white():
    img = Image.new("P", (2, 1))
    img.putpalette([*BLACK, *RED] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    for fmt in ("PNG", "GIF"):
        px = assert_rgb(decode_image(save(img, fmt, transparency=0)), 1, 2)
        assert px[0].tolist() == [list(WHITE), list(RED)], fmt


def test_rgb_png_with_transparent_colour_key():
    img = Image.new("RGB", (2, 1), BLACK)
    img.putpixel((1, 0), BLUE)
    px = assert_rgb(decode_image(save(img, "PNG", transparency=BLACK)), 1, 2)
    assert px[0].tolist() == [list(WHITE), list(BLUE)]


# --------------------------------------------------------------------------- #
# Animations: first frame only


def _frames():
    return [Image.new("RGB", (6, 4), colour) for colour in (RED, GREEN, BLUE)]


def test_animated_gif_first_frame():
    first, *rest = _frames()
    data = save(first, "GIF", save_all=True, append_images=rest, duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    px = assert_rgb(decode_image(data), 4, 6)
    assert (px == RED).all()


def test_animated_png_first_frame():
    first, *rest = _frames()
    data = save(first, "PNG", save_all=True, append_images=rest, duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    px = assert_rgb(decode_image(data), 4, 6)
    assert (px == RED).all()


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_first_frame():
    first, *rest = _frames()
    data = save(first, "WEBP", save_all=True, append_images=rest, duration=50, lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    decoded = decode_image(data)
    assert decoded.format == "WEBP"
    assert close(assert_rgb(decoded, 4, 6), RED, 2)


# --------------------------------------------------------------------------- #
# Decompression bombs


def _forbid_pixel_decoding(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixels were decoded for an image that must be refused")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_decompression_bomb_refused_before_decoding(monkeypatch):
    data = bomb_png(30_000)  # 900 million pixels in ~100 KB
    assert len(data) < 200_000
    _forbid_pixel_decoding(monkeypatch)
    filters_before = list(warnings.filters)
    err = decode_error(data)
    assert err.code == "too_many_pixels"
    assert list(warnings.filters) == filters_before  # no lasting change


def test_image_in_pillow_warning_range_refused(monkeypatch):
    # 100 million pixels: Pillow only *warns* (limit ~89M), we must refuse.
    data = bomb_png(10_000)
    _forbid_pixel_decoding(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stray warning would fail the test
        assert decode_error(data, max_pixels=10**9).code == "too_many_pixels"


def test_max_pixels_is_checked_from_header(monkeypatch):
    data = save(Image.new("L", (100, 50)), "PNG")
    assert decode_image(data, max_pixels=5000).width == 100  # exactly at the limit
    _forbid_pixel_decoding(monkeypatch)
    err = decode_error(data, max_pixels=4999)
    assert err.code == "too_many_pixels" and "100x50" in err.message


def test_default_limit():
    assert DEFAULT_MAX_PIXELS == 40_000_000


# --------------------------------------------------------------------------- #
# Not images, truncated and damaged files


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty"),
        (b"Hello, this is just a text file.\n", "not_an_image"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "not_an_image"),
        (b"<!DOCTYPE html>\n<html><head><title>x</title></head><body>hi</body></html>", "not_an_image"),
        (b'{"not": "an image"}', "not_an_image"),
        (bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8)), "not_an_image"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported"),
    ],
    ids=["empty", "text", "pdf", "html", "json", "random", "svg"],
)
def test_non_images_refused(data, code):
    assert decode_error(data).code == code


def test_known_but_unsupported_format_refused():
    assert decode_error(save(Image.new("RGB", (16, 16), RED), "ICO")).code == "unsupported"


def _noisy(fmt: str) -> bytes:
    rng = np.random.default_rng(1)
    return save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_files_refused(fmt, fraction):
    data = _noisy(fmt)
    assert decode_error(data[: int(len(data) * fraction)]).code == "truncated"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_header_refused(fmt):
    assert decode_error(_noisy(fmt)[:12]).code == "truncated"


def test_damaged_png_refused():
    data = bytearray(_noisy("PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = bytes(50)  # wreck the compressed stream
    assert decode_error(bytes(data)).code in {"corrupt", "truncated"}


def test_global_pillow_state_untouched():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    limit = Image.MAX_IMAGE_PIXELS
    data = _noisy("PNG")
    decode_error(data[: len(data) // 2])
    decode_image(data)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False and Image.MAX_IMAGE_PIXELS == limit


# --------------------------------------------------------------------------- #
# API details


@pytest.mark.parametrize("bad", ["text", None, 3, [1, 2]])
def test_non_bytes_argument_is_a_value_error(bad):
    with pytest.raises(ValueError, match="bytes") as info:
        decode_image(bad)
    assert not isinstance(info.value, ImageDecodeError)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "10"])
def test_bad_max_pixels(bad):
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", max_pixels=bad)


def test_error_is_value_error_and_picklable():
    err = ImageDecodeError("truncated", "The image file is incomplete.")
    assert isinstance(err, ValueError)
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.code, clone.message, str(clone)) == ("truncated", err.message, err.message)
    with pytest.raises(ValueError, match="unknown"):
        ImageDecodeError("nope", "x")


def test_decoded_image_is_frozen_and_validated():
    decoded = decode_image(save(Image.new("RGB", (2, 2)), "PNG"))
    with pytest.raises(AttributeError):
        decoded.width = 5  # type: ignore[misc]
    with pytest.raises(ValueError):
        DecodedImage(pixels=np.zeros((2, 2), np.uint8), format="PNG", width=2, height=2)
    with pytest.raises(ValueError):
        DecodedImage(pixels=np.zeros((2, 3, 3), np.uint8), format="PNG", width=2, height=2)


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (5, 7, 4)])
def test_encode_png_round_trip(shape):
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    data = encode_png(arr)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8), [[0, 1]]],
)
def test_encode_png_rejects_bad_arrays(bad):
    with pytest.raises(ValueError):
        encode_png(bad)


def test_decode_does_not_import_cv2_or_torch():
    code = (
        "import sys, shared.imaging, shared.imaging.decode; "
        "bad = [m for m in ('cv2', 'torch', 'shared.imaging.render') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
