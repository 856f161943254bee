"""Safe image decoding: bytes in, an RGB picture out, or an :class:`ImageError` with a reason.

Every stage that looks at pixels (dedup hashing, training, evaluation, serving)
decodes through here, so they all agree on what an image *is*:

* RGB, whatever the stored mode (L, LA, P with transparency, RGBA, CMYK, 16-bit...);
  transparent pixels are composited on white.
* EXIF orientation applied, so a phone photo taken in portrait is portrait.
* The first frame of an animated image.
* A pixel limit checked from the header, before any pixel is allocated, so a
  decompression bomb costs nothing. PIL's process-wide ``MAX_IMAGE_PIXELS`` is
  left alone: it is shared by every thread and every caller.
* Optionally a reduced-size JPEG decode (PIL "draft" mode) for hashing and
  thumbnails: about 5x faster than a full decode on a 12-megapixel photo.

Failures carry a short machine-readable reason from :data:`REASONS`, which the
manifest records for rejected files.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from kaedama.errors import KaedamaError

REASONS = ("empty", "truncated", "not_an_image", "too_large", "unsupported_mode", "corrupt")
"""Every value that :attr:`ImageError.reason` can take."""

DEFAULT_MAX_PIXELS = 64_000_000
# Files larger than this are refused before they are read (storage.read_bytes(max_bytes=)):
# 256 MiB is far above any photo (a 100 MP JPEG is ~40 MB), far below a worker's memory.
DEFAULT_MAX_BYTES = 256 * 2**20

# Formats we hand to PIL. An allow-list rather than "whatever PIL can open": it
# keeps exotic parsers (and EPS, whose loader runs Ghostscript) away from
# untrusted uploads, and stops weak sniffers (TGA has no magic number) from
# claiming text files.
_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "PPM", "ICO")
Image.init()
ACCEPTED_FORMATS: tuple[str, ...] = tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)

# Exceptions that PIL's plugins raise on malformed input besides OSError. Caught
# by type (never a bare except) and reported as "corrupt" with PIL's message.
_DECODER_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
    ZeroDivisionError,
)

# EXIF orientation -> the transposition that displays the stored pixels upright
# (the same table as PIL.ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})

_WHITE = (255, 255, 255)

_HINTS = {
    "empty": "the file has zero bytes; re-upload it",
    "truncated": "the file ends early (an interrupted upload or copy?); re-upload it",
    "not_an_image": f"it is not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})",
    "too_large": "raise max_pixels if this image is wanted, or downscale it",
    "unsupported_mode": "convert it to 8-bit RGB (e.g. save as PNG or JPEG) and re-upload it",
    "corrupt": "the image data is damaged; re-export or re-upload it",
}


class ImageError(KaedamaError):
    """An image that cannot be decoded, with a machine-readable ``reason`` from REASONS.

    Args:
        reason: one of :data:`REASONS`.
        message: what went wrong, for people.
        uri: where the bytes came from, when the caller knows.
    """

    def __init__(self, reason: str, message: str, uri: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.message = message
        self.uri = uri
        where = f"{uri}: " if uri else ""
        super().__init__(f"{where}{message} [{reason}]; {_HINTS[reason]}")

    def with_uri(self, uri: str) -> ImageError:
        """The same error, naming ``uri`` (for callers that learn the URI later)."""
        return ImageError(self.reason, self.message, uri=uri)

    def __reduce__(self):
        # Beam workers and DataLoader processes pickle exceptions; keep the fields.
        return (ImageError, (self.reason, self.message, self.uri))


@dataclass(frozen=True)
class Exif:
    """What a photo's EXIF header says about itself; empty fields were absent or unreadable.

    Attributes:
        taken: capture time, ISO 8601 (``2021-07-04T18:30:05``), with the UTC offset when
            the file records one (``OffsetTimeOriginal``); ``DateTimeOriginal``, else
            ``DateTime``.
        make, model: the camera's maker and model, as recorded (trimmed, <= 64 chars).
        gps: ``(latitude, longitude)`` in degrees, or None.
    """

    taken: str = ""
    make: str = ""
    model: str = ""
    gps: tuple[float, float] | None = None


@dataclass(frozen=True)
class ImageInfo:
    """What the header says. ``width``/``height`` are after EXIF orientation, at full size."""

    format: str
    width: int
    height: int
    mode: str
    frames: int
    exif: Exif = field(default_factory=Exif)


# --------------------------------------------------------------------------- helpers


def _magic_format(data: bytes) -> str | None:
    """The format that the first bytes announce, or None; used only to explain failures."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def _missing_end(data: bytes, fmt: str | None) -> bool:
    """True when a container-level end marker is missing (the file was cut short).

    Only consulted after decoding has failed, to tell "truncated" from "corrupt";
    a readable image is never rejected for a missing marker.
    """
    tail = data.rstrip(b"\x00")  # some cameras pad JPEGs with zeros after EOI
    if fmt == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" not in data[-32:]
    if fmt == "GIF":
        return not tail.endswith(b";")
    if fmt == "WEBP":
        declared = struct.unpack("<I", data[4:8])[0] + 8 if len(data) >= 8 else 1 << 62
        return len(data) < declared
    if fmt == "BMP" and len(data) >= 6:
        return len(data) < struct.unpack("<I", data[2:6])[0]
    return False


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8), 1 when absent or unreadable.

    A damaged EXIF block must not reject an otherwise good photo, so errors here
    fall back to "upright" instead of failing the decode.
    """
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODER_ERRORS:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _frames(img: Image.Image) -> int:
    try:
        return int(getattr(img, "n_frames", 1))
    except _DECODER_ERRORS:
        # Counting frames walks the whole file; a cut-off animation still has frame 0.
        return 1


def _failure(exc: BaseException, data: bytes, uri: str | None, stage: str) -> ImageError:
    """Map a PIL exception to an ImageError with the right reason."""
    fmt = _magic_format(data)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError("too_large", f"refused by the decompression-bomb check: {text}", uri)
    if isinstance(exc, UnidentifiedImageError):
        if fmt is None:
            return ImageError("not_an_image", f"not a recognised image ({len(data)} bytes)", uri)
        if _missing_end(data, fmt):
            return ImageError("truncated", f"{fmt} header cut short ({len(data)} bytes)", uri)
        return ImageError("corrupt", f"{fmt} header cannot be read", uri)
    if "truncated" in text.lower() or isinstance(exc, EOFError) or _missing_end(data, fmt):
        what = fmt or "image"
        return ImageError("truncated", f"{what} data ends early while {stage}: {text}", uri)
    return ImageError("corrupt", f"{type(exc).__name__} while {stage}: {text}", uri)


def _open(data: bytes, uri: str | None) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected image bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("empty", "zero bytes", uri)
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _failure(exc, data, uri, "reading the header") from exc
    except _DECODER_ERRORS as exc:
        raise _failure(exc, data, uri, "reading the header") from exc


_EXIF_TIME = "%Y:%m:%d %H:%M:%S"
_UTC_OFFSET = re.compile(r"[+-](0\d|1[0-4]):[0-5]\d")
_TEXT_LIMIT = 64


def _exif_text(value: object) -> str:
    """A printable EXIF string (NULs and padding stripped, bounded), or ""."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return ""
    text = "".join(c for c in value if c.isprintable()).strip()
    return text[:_TEXT_LIMIT]


def _exif_time(value: object, offset: object) -> str:
    """EXIF ``YYYY:MM:DD HH:MM:SS`` as ISO 8601 (with a valid offset), or "" if invalid."""
    try:
        taken = datetime.strptime(_exif_text(value), _EXIF_TIME)
    except ValueError:
        return ""  # absent, "0000:00:00 00:00:00", or garbage
    offset = _exif_text(offset)
    return taken.isoformat() + (offset if _UTC_OFFSET.fullmatch(offset) else "")


def _degrees(dms: object, ref: object, limit: float) -> float | None:
    """EXIF (degrees, minutes, seconds) rationals and N/S/E/W to signed degrees."""
    if not isinstance(dms, tuple) or len(dms) != 3:
        return None
    value = float(dms[0]) + float(dms[1]) / 60 + float(dms[2]) / 3600
    if not math.isfinite(value) or value > limit:
        return None
    return round(-value if _exif_text(ref) in ("S", "W") else value, 6)


def _exif(img: Image.Image) -> Exif:
    """The EXIF facts of an opened image (header only). A damaged block gives what is readable.

    Pillow parses the EXIF block once per image (the orientation reads it too).
    """
    try:
        exif = img.getexif()
        if not exif:
            return Exif()
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        taken = _exif_time(
            sub.get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime),
            sub.get(ExifTags.Base.OffsetTimeOriginal),
        )
        make = _exif_text(exif.get(ExifTags.Base.Make))
        model = _exif_text(exif.get(ExifTags.Base.Model))
    except _DECODER_ERRORS:
        return Exif()
    try:
        gps_ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
        lat = _degrees(
            gps_ifd.get(ExifTags.GPS.GPSLatitude), gps_ifd.get(ExifTags.GPS.GPSLatitudeRef), 90
        )
        lon = _degrees(
            gps_ifd.get(ExifTags.GPS.GPSLongitude), gps_ifd.get(ExifTags.GPS.GPSLongitudeRef), 180
        )
    except _DECODER_ERRORS:
        lat = lon = None
    gps = (lat, lon) if lat is not None and lon is not None else None
    return Exif(taken, make, model, gps)


def _info(img: Image.Image, orientation: int) -> ImageInfo:
    width, height = img.size
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return ImageInfo(
        format=img.format or "",
        width=width,
        height=height,
        mode=img.mode,
        frames=_frames(img),
        exif=_exif(img),
    )


def _check_pixels(info: ImageInfo, max_pixels: int, uri: str | None) -> None:
    pixels = info.width * info.height
    if pixels <= 0:
        raise ImageError("corrupt", f"header says {info.width}x{info.height}", uri)
    if pixels > max_pixels:
        raise ImageError(
            "too_large",
            f"{info.width}x{info.height} = {pixels:,} pixels is over the limit of {max_pixels:,}",
            uri,
        )


def _on_white(img: Image.Image) -> Image.Image:
    """Composite an image with alpha over white and drop the alpha."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float single-channel images to 8-bit RGB.

    PIL's own ``convert("L")`` clips these to 0..255, which turns most 16-bit
    photos white; here the value range is mapped instead:

    * ``I;16``/``I;16B``/``I;16L``/``I;16N``: 0..65535 -> 0..255 (divide by 257,
      rounded), so 65535 -> 255. Signed ``I;16S`` is stretched like ``I`` below.
    * ``I``: treated as 16-bit when its values lie in 0..65535 (what PNG/TIFF
      16-bit grey decodes to), otherwise stretched from min..max.
    * ``F``: 0..1 -> 0..255 when the values lie in [0, 1], otherwise min..max.
    """
    array = np.asarray(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N") or (
        img.mode == "I" and array.size and array.min() >= 0 and array.max() <= 65535
    ):
        scaled = (array.astype(np.uint32) * 255 + 32767) // 65535
    else:
        values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        if img.mode == "F" and finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            low, high = 0.0, 1.0
        else:
            low = float(finite.min()) if finite.size else 0.0
            high = float(finite.max()) if finite.size else 0.0
        span = high - low if high > low else 1.0
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        # Round half up, like the integer path (multiply before dividing to stay exact).
        scaled = np.floor((np.clip(values, low, high) - low) * 255.0 / span + 0.5)
    return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")


def _to_rgb(img: Image.Image, uri: str | None) -> Image.Image:
    mode = img.mode
    if mode in ("RGB", "L") and "transparency" in img.info:
        # A PNG colour key (tRNS): pixels of that one colour are transparent.
        return _on_white(img)
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA"):
        return _on_white(img)
    if mode in ("RGBa", "La"):  # premultiplied alpha: un-premultiply first
        return _on_white(img.convert(mode.upper()))
    if mode == "P":
        if "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA":
            return _on_white(img.convert("RGBA"))
        return img.convert("RGB")
    if mode in ("L", "1", "CMYK", "YCbCr", "HSV"):
        # CMYK: PIL's conversion (no colour management); Adobe's inverted CMYK
        # JPEGs are already un-inverted by the JPEG plugin.
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(img)
    raise ImageError("unsupported_mode", f"pixel mode {mode!r} has no RGB conversion", uri)


# --------------------------------------------------------------------------- API


def probe(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, uri: str | None = None
) -> ImageInfo:
    """Read the header only: format, oriented size, mode, frame count.

    No pixel data is decoded, so a truncated body is not detected here (use
    :func:`decode`); an empty file, a non-image and an oversized header are.

    Args:
        data: the file's bytes.
        max_pixels: refuse headers announcing more pixels than this.
        uri: named in errors.

    Returns:
        The :class:`ImageInfo`; raises :class:`ImageError` otherwise.
    """
    with _open(data, uri) as img:
        info = _info(img, _orientation(img))
    _check_pixels(info, max_pixels, uri)
    return info


def decode_with_info(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
    uri: str | None = None,
    mode: str = "RGB",
) -> tuple[Image.Image, ImageInfo]:
    """Decode to an RGB (or grayscale), upright, first-frame image, with its header info.

    Args:
        data: the file's bytes.
        max_pixels: refuse images with more pixels than this, judged from the
            header before anything is allocated.
        draft: ``(width, height)`` in displayed (oriented) pixels: JPEGs are then
            decoded at the smallest 1/2, 1/4 or 1/8 scale that is still at least
            this large. Other formats ignore it. ``info`` stays the full size.
        uri: named in errors.
        mode: ``"RGB"``, or ``"L"`` for grayscale: colour JPEGs then decode their luma
            channel only (libjpeg skips the chroma planes' upsampling and the colour
            conversion, ~1/3 less work); other inputs are converted from their RGB
            rendering (alpha over white, 16-bit scaled), so both modes agree up to
            libjpeg's rounding.

    Returns:
        ``(image, info)``: a ``PIL.Image.Image`` in ``mode`` and the full-size
        :class:`ImageInfo`.

    Raises:
        ImageError: with ``reason`` one of :data:`REASONS`.
    """
    if draft is not None and (len(draft) != 2 or min(int(draft[0]), int(draft[1])) < 1):
        raise ValueError(f"draft must be (width, height) of positive ints, got {draft!r}")
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    data = bytes(data) if isinstance(data, (bytearray, memoryview)) else data
    with _open(data, uri) as img:
        orientation = _orientation(img)
        info = _info(img, orientation)
        _check_pixels(info, max_pixels, uri)
        try:
            if img.format in ("JPEG", "MPO") and (draft is not None or mode == "L"):
                want = img.size
                if draft is not None:
                    want = draft[::-1] if orientation in _SWAPS_AXES else draft
                # Pillow honours "L" only for YCbCr/grayscale JPEGs; CMYK stays CMYK.
                img.draft(mode, (int(want[0]), int(want[1])))
            img.load()
            if mode == "L" and img.mode == "L" and "transparency" not in img.info:
                rgb = img
            else:
                rgb = _to_rgb(img, uri)
                if mode == "L":
                    rgb = rgb.convert("L")
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _failure(exc, data, uri, "decoding") from exc
        except _DECODER_ERRORS as exc:
            raise _failure(exc, data, uri, "decoding") from exc
        method = _ORIENTATION_TRANSPOSE.get(orientation)
        if method is not None:
            rgb = rgb.transpose(method)
        elif rgb is img:
            rgb = img.copy()  # detach from the file object that the with-block closes
    return rgb, info


def decode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
    uri: str | None = None,
    mode: str = "RGB",
) -> Image.Image:
    """Decode to an RGB (or ``mode="L"`` grayscale), EXIF-upright, first-frame image.

    See :func:`decode_with_info` for the arguments; raises :class:`ImageError`.
    """
    return decode_with_info(data, max_pixels=max_pixels, draft=draft, uri=uri, mode=mode)[0]


def decode_array(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
    uri: str | None = None,
) -> np.ndarray:
    """Decode to a writable ``HxWx3`` ``uint8`` array (see :func:`decode_with_info`)."""
    image = decode(data, max_pixels=max_pixels, draft=draft, uri=uri)
    return np.array(image, dtype=np.uint8)
