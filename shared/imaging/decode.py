"""Decode untrusted uploaded bytes into an upright RGB ``uint8`` array.

Pillow + numpy only (no torch, no OpenCV): the web process imports this to
validate uploads before queueing a job, and the worker uses it to get pixels.

What :func:`decode_image` guarantees for the returned array:

* shape ``(H, W, 3)``, dtype ``uint8``, RGB, C-contiguous, writeable;
* the EXIF orientation has been applied (the image is upright as a browser
  shows it);
* transparency is composited onto white; grayscale, 1-bit, palette, CMYK,
  YCbCr, LAB and 16-bit/32-bit/float images are converted to 8-bit RGB with
  their value range scaled (not clipped);
* only the first frame of an animation (GIF, APNG, WebP) or multi-page file
  (TIFF) is used.

Everything else is refused with :class:`ImageDecodeError`, whose ``code`` is
one of :data:`ERROR_CODES`. The file type is always detected from the content;
file names and declared content types are never consulted.

Pillow's global state is left alone: ``ImageFile.LOAD_TRUNCATED_IMAGES`` must
keep its default ``False`` (truncated files are then refused) and
``Image.MAX_IMAGE_PIXELS`` is not changed.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ERROR_CODES",
    "SUPPORTED_FORMATS",
    "DecodedImage",
    "ImageDecodeError",
    "decode_image",
    "encode_png",
]

#: Largest ``width * height`` accepted by default (e.g. 8000 x 5000).
DEFAULT_MAX_PIXELS = 40_000_000

#: Pillow format names accepted as uploads (``MPO``, the multi-picture JPEG
#: written by many cameras, is opened by the ``JPEG`` plugin). Formats that
#: this Pillow build cannot read are skipped.
SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

#: Every value :attr:`ImageDecodeError.code` can take.
ERROR_CODES = frozenset(
    {
        "empty",  # zero bytes
        "not_an_image",  # text, HTML, PDF, random bytes ...
        "unsupported",  # an image, but a format or pixel mode not accepted
        "truncated",  # a supported image whose data ends early
        "corrupt",  # a supported image whose data is damaged
        "too_many_pixels",  # width * height above the limit (decompression bomb)
    }
)

_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """An upload that cannot be used as an image.

    Attributes:
        code: short machine-readable reason, one of :data:`ERROR_CODES`.
        message: human-readable explanation, safe to show to the uploader
            (also ``str(error)``).
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown ImageDecodeError code {code!r}; expected one of {sorted(ERROR_CODES)}")
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # keep picklable (e.g. across Celery) despite two args
        return (type(self), (self.code, self.message))

    def __repr__(self) -> str:
        return f"ImageDecodeError(code={self.code!r}, message={self.message!r})"


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload.

    Attributes:
        pixels: ``(height, width, 3)`` ``uint8`` RGB array, values 0-255,
            upright (EXIF orientation applied), C-contiguous.
        format: the detected container format, as Pillow names it
            (``"PNG"``, ``"JPEG"``, ``"MPO"``, ``"GIF"``, ``"WEBP"``,
            ``"BMP"``, ``"TIFF"``).
        width: ``pixels.shape[1]``.
        height: ``pixels.shape[0]``.
    """

    pixels: np.ndarray
    format: str
    width: int
    height: int

    def __post_init__(self) -> None:
        p = self.pixels
        if not isinstance(p, np.ndarray) or p.dtype != np.uint8 or p.ndim != 3 or p.shape[2] != 3:
            raise ValueError(
                "pixels must be a (H, W, 3) uint8 array, got "
                f"{type(p).__name__} {getattr(p, 'shape', None)} {getattr(p, 'dtype', None)}"
            )
        if p.shape[:2] != (self.height, self.width):
            raise ValueError(
                f"pixels shape {p.shape} does not match height={self.height}, width={self.width}"
            )


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an uploaded image file, refusing anything unsafe or unusable.

    Args:
        data: the raw file content (``bytes``, ``bytearray`` or ``memoryview``).
        max_pixels: largest accepted ``width * height``, checked from the
            header before any pixel is decoded. Pillow's own decompression
            bomb limit (``Image.MAX_IMAGE_PIXELS``, about 89 million) also
            applies, so values above it have no effect.

    Returns:
        A :class:`DecodedImage` with ``(H, W, 3)`` ``uint8`` RGB pixels.

    Raises:
        ImageDecodeError: the bytes are not a usable image; ``code`` says why
            (``empty``, ``not_an_image``, ``unsupported``, ``truncated``,
            ``corrupt``, ``too_many_pixels``).
        ValueError: ``data`` is not bytes-like or ``max_pixels`` is not a
            positive integer (programming errors, not bad uploads).
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if not data:
        raise ImageDecodeError("empty", "The file is empty (0 bytes).")

    Image.init()  # register every plugin (idempotent) so OPEN lists them all
    formats = [name for name in SUPPORTED_FORMATS if name in Image.OPEN]

    # Pillow warns (then raises) about decompression bombs in Image.open; turn
    # the warning into an exception too. catch_warnings restores the filters.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=formats)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _too_many_pixels(None, max_pixels) from None
        except UnidentifiedImageError:
            raise _identify_failure(data) from None
        except Exception as exc:  # noqa: BLE001 - any parser failure is a bad upload
            raise _broken(exc, stage="header") from None

        with img:
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageDecodeError("corrupt", f"The image has an invalid size {width}x{height}.")
            if width * height > max_pixels:
                raise _too_many_pixels((width, height), max_pixels)
            fmt = img.format or "unknown"
            try:
                img.load()  # decode the (first frame's) pixels completely
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise _too_many_pixels((width, height), max_pixels) from None
            except MemoryError:
                raise _too_many_pixels((width, height), max_pixels) from None
            except Exception as exc:  # noqa: BLE001
                raise _broken(exc, stage="pixels") from None

            upright = _apply_exif_orientation(img)
            try:
                pixels = _to_rgb_uint8(upright)
            except ValueError as exc:
                raise ImageDecodeError(
                    "unsupported", f"Images with pixel mode {upright.mode!r} are not supported ({exc})."
                ) from None
            finally:
                if upright is not img:
                    upright.close()

    h, w = pixels.shape[:2]
    return DecodedImage(pixels=pixels, format=fmt, width=int(w), height=int(h))


#: zlib level of the PNGs we write: 1 is several times faster than Pillow's
#: default (6) on photographs (about 0.7 s less per 720p overlay) for files
#: some 10-20% larger; still lossless.
PNG_COMPRESS_LEVEL = 1


def encode_png(pixels: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Encode an image array as PNG bytes (lossless).

    Args:
        pixels: ``uint8`` array of shape ``(H, W)`` (grayscale), ``(H, W, 3)``
            (RGB) or ``(H, W, 4)`` (RGBA), values 0-255, ``H, W >= 1``.
        compress_level: zlib level 0 (none) to 9 (smallest, slowest).

    Returns:
        The PNG file content.

    Raises:
        ValueError: wrong type, dtype, shape or an empty array.
    """
    if not isinstance(pixels, np.ndarray):
        raise ValueError(f"pixels must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must have dtype uint8, got {pixels.dtype}")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        raise ValueError(f"pixels must have shape (H, W), (H, W, 3) or (H, W, 4), got {pixels.shape}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"pixels must not be empty, got shape {pixels.shape}")
    if isinstance(compress_level, bool) or not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level must be an integer from 0 to 9, got {compress_level!r}")
    out = io.BytesIO()
    # uint8 (H, W) -> "L", (H, W, 3) -> "RGB", (H, W, 4) -> "RGBA"
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


# --------------------------------------------------------------------------- #
# Helpers


def _too_many_pixels(size: tuple[int, int] | None, max_pixels: int) -> ImageDecodeError:
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "too many pixels"
    return ImageDecodeError(
        "too_many_pixels",
        f"The image is too large ({what}); at most {limit:,} pixels are accepted.",
    )


def _broken(exc: BaseException, *, stage: str) -> ImageDecodeError:
    """Map an exception raised while parsing a recognised image to an error."""
    text = str(exc).lower()
    if isinstance(exc, EOFError) or (isinstance(exc, OSError) and "truncated" in text):
        return ImageDecodeError(
            "truncated", "The image file is incomplete (truncated); please upload the whole file."
        )
    where = "header" if stage == "header" else "pixel data"
    return ImageDecodeError("corrupt", f"The image {where} is damaged and cannot be decoded.")


def _identify_failure(data: bytes) -> ImageDecodeError:
    """Explain why no supported format recognised ``data``."""
    prefix = data[:16]
    matches = []
    for name, (_factory, accept) in Image.OPEN.items():
        if accept is None:
            continue
        try:
            hit = accept(prefix)
        except Exception:  # noqa: BLE001 - a plugin's sniffing must not break us
            continue
        if hit is True or (hit and not isinstance(hit, str)):
            matches.append(name)
    supported = [m for m in matches if m in SUPPORTED_FORMATS]
    if supported:
        # Right magic number but the header could not be parsed.
        if len(data) < 64:
            return ImageDecodeError(
                "truncated",
                f"The file starts like a {supported[0]} image but ends after {len(data)} bytes.",
            )
        return ImageDecodeError("corrupt", f"The file starts like a {supported[0]} image but its header is damaged.")
    if matches:
        return ImageDecodeError(
            "unsupported",
            f"{matches[0]} images are not supported; please upload one of: {', '.join(SUPPORTED_FORMATS)}.",
        )
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"%pdf"):
        kind = "a PDF document"
    elif head.startswith((b"<svg", b"<?xml")) and b"<svg" in data[:4096].lower():
        return ImageDecodeError(
            "unsupported",
            f"SVG (vector) images are not supported; please upload one of: {', '.join(SUPPORTED_FORMATS)}.",
        )
    elif head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        kind = "an HTML page"
    elif _looks_like_text(data[:4096]):
        kind = "a text file"
    else:
        return ImageDecodeError("not_an_image", "The file is not in a recognised image format.")
    return ImageDecodeError("not_an_image", f"The file is not an image (it looks like {kind}).")


def _looks_like_text(sample: bytes) -> bool:
    if b"\x00" in sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sample is fine.
        if exc.start < len(sample) - 3:
            return False
    return True


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Return ``img`` rotated/flipped upright per its EXIF orientation tag.

    Returns ``img`` itself when there is no (valid) orientation; malformed
    EXIF data is ignored, as browsers do.
    """
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF: show the image as stored
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        return img


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map ``[low, high]`` to ``[0, 255]``, round, clip, as uint8."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to ``(H, W, 3)`` uint8 RGB.

    * ``I;16*`` (16-bit grayscale): ``v * 255 / 65535``, rounded.
    * ``I`` (32-bit int): as 16-bit when all values lie in 0..65535, else
      min-max normalised.
    * ``F`` (float): NaN/inf -> 0; values in [0, 1] are scaled by 255, values
      in [0, 255] kept, anything else min-max normalised.
    * anything with an alpha channel or a transparency key is composited
      onto white; everything else goes through Pillow's ``convert("RGB")``.

    Raises:
        ValueError: Pillow cannot convert this mode.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        raw = np.asarray(img).astype(np.uint32)
        return _gray_to_rgb(((raw * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "I":
        raw = np.asarray(img)
        lo, hi = int(raw.min()), int(raw.max())
        if lo >= 0 and hi <= 65535:
            return _gray_to_rgb(_scale_to_uint8(raw, 0, 65535))
        return _gray_to_rgb(_scale_to_uint8(raw, lo, hi))
    if mode == "F":
        raw = np.asarray(img).astype(np.float64)
        raw = np.where(np.isfinite(raw), raw, 0.0)
        lo, hi = float(raw.min()), float(raw.max())
        if lo >= 0.0 and hi <= 1.0:
            return _gray_to_rgb(_scale_to_uint8(raw, 0.0, 1.0))
        if lo >= 0.0 and hi <= 255.0:
            return _gray_to_rgb(_scale_to_uint8(raw, 0.0, 255.0))
        return _gray_to_rgb(_scale_to_uint8(raw, lo, hi))
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode != "RGB":
        rgb = img.convert("RGB")
    else:
        rgb = img
    return np.array(rgb, dtype=np.uint8, order="C", copy=True)
