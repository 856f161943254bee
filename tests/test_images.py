"""kaedama.images: every bad case is built here and must give its exact reason and pixels."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kaedama.errors import KaedamaError
from kaedama.images import (
    DEFAULT_MAX_PIXELS,
    REASONS,
    ImageError,
    ImageInfo,
    decode,
    decode_array,
    decode_with_info,
    probe,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """A smooth RGB picture (gradients), so JPEG keeps it close."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y + seed) % 256]
    )
    return Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8), "RGB")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height RGB but carries one compressed row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + bytes(3 * min(width, 1024)))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", row)
        + png_chunk(b"IEND", b"")
    )


def reason_of(data: bytes, **kw) -> str:
    with pytest.raises(ImageError) as info:
        decode(data, **kw)
    return info.value.reason


# --------------------------------------------------------------------------- failures


def test_zero_bytes_is_empty_for_decode_and_probe():
    assert reason_of(b"") == "empty"
    with pytest.raises(ImageError) as info:
        probe(b"")
    assert info.value.reason == "empty"


def test_jpeg_cut_mid_stream_is_truncated():
    data = encode(photo(), "JPEG", quality=90)
    assert reason_of(data[: len(data) // 2]) == "truncated"
    # Cut inside the header: PIL cannot even read the size.
    assert reason_of(data[:30]) == "truncated"
    # The complete file decodes, so the cut is what made the difference.
    assert decode(data).size == (64, 48)


def test_png_and_webp_cut_short_are_truncated():
    png = encode(photo(), "PNG")
    assert reason_of(png[: len(png) * 2 // 3]) == "truncated"
    webp = encode(photo(), "WEBP", quality=80)
    assert reason_of(webp[: len(webp) // 2]) == "truncated"
    assert decode(webp).size == (64, 48)


def test_text_file_named_jpg_is_not_an_image():
    assert reason_of(b"name,label\nfoo.jpg,cat\n") == "not_an_image"
    assert reason_of(b"<!DOCTYPE html><html><body>Access denied</body></html>") == "not_an_image"


def test_damaged_png_header_is_corrupt():
    data = bytearray(encode(photo(), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    assert reason_of(bytes(data)) == "corrupt"


def test_mode_without_rgb_conversion_is_unsupported():
    assert reason_of(encode(Image.new("LAB", (4, 4)), "TIFF")) == "unsupported_mode"


def test_30000_square_png_header_is_refused_before_allocation():
    data = png_header_only(30000, 30000)
    assert len(data) < 200
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as info:
            decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert peak < 2_000_000
    with pytest.raises(ImageError) as info:
        probe(data)
    assert info.value.reason == "too_large"


def test_bomb_is_refused_under_an_address_space_limit():
    """PIL's pixel buffers are C allocations that tracemalloc cannot see: run the
    decode in a child whose address space could not hold the image, and prove that
    the limit bites by failing to allocate the same amount there."""
    code = textwrap.dedent(
        f"""
        import resource, numpy as np
        from kaedama.images import decode, ImageError
        data = {png_header_only(9000, 9000)!r}
        limit = 1_500_000_000
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            decode(data)
        except ImageError as exc:
            print("reason", exc.reason)
        try:
            np.ones(9000 * 9000 * 4 * 5, dtype=np.uint8)
        except MemoryError:
            print("limit bites")
        """
    )
    # 9000x9000 = 81 Mpx: over our default limit, under PIL's own bomb warning,
    # so it is our header check (not PIL's) that refuses it.
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["reason too_large", "limit bites"]


def test_max_pixels_is_configurable_and_inclusive():
    data = encode(photo(100, 100), "PNG")
    assert reason_of(data, max_pixels=9_999) == "too_large"
    assert decode(data, max_pixels=10_000).size == (100, 100)
    assert DEFAULT_MAX_PIXELS == 64_000_000


# --------------------------------------------------------------------------- modes


def test_cmyk_jpeg_pure_cyan_becomes_cyan():
    data = encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image, info = decode_with_info(data)
    assert image.mode == "RGB" and info.mode == "CMYK"
    r, g, b = image.getpixel((8, 8))
    assert r <= 3 and g >= 252 and b >= 252


def test_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    array = decode_array(data)
    assert array.shape == (2, 4, 3) and array.dtype == np.uint8
    expected = np.rint(values / 257).astype(np.uint8)
    assert array[..., 0].tolist() == expected.tolist()
    assert array[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()


def test_32_bit_integer_and_float_images_are_scaled():
    ints = np.array([[0, 65535]], dtype=np.int32)
    assert decode_array(encode(Image.fromarray(ints, "I"), "TIFF"))[0, :, 0].tolist() == [0, 255]
    negative = np.array([[-100, 0, 100]], dtype=np.int32)
    stretched = decode_array(encode(Image.fromarray(negative, "I"), "TIFF"))[0, :, 0]
    assert stretched.tolist() == [0, 128, 255]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert decode_array(encode(Image.fromarray(floats, "F"), "TIFF"))[0, :, 0].tolist() == [
        0,
        128,
        255,
    ]


def test_palette_png_transparent_pixel_becomes_white():
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    img.putdata([0, 1])
    data = encode(img, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    image = decode(data)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent red -> white
    assert image.getpixel((1, 0)) == (0, 0, 255)
    # Without transparency the same palette keeps its red.
    assert decode(encode(img, "PNG")).getpixel((0, 0)) == (255, 0, 0)


def test_alpha_is_composited_on_white():
    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (0, 255), (0, 128)])
    assert decode(encode(la, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    assert decode(encode(la, "PNG")).getpixel((1, 0)) == (0, 0, 0)
    half = decode(encode(la, "PNG")).getpixel((2, 0))
    assert all(126 <= v <= 128 for v in half)
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255)])
    image = decode(encode(rgba, "PNG"))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (255, 0, 0)


def test_png_colour_key_transparency_becomes_white():
    img = Image.new("RGB", (2, 1), (255, 0, 0))
    img.putpixel((1, 0), (0, 128, 0))
    data = encode(img, "PNG", transparency=(255, 0, 0))
    assert Image.open(io.BytesIO(data)).info["transparency"] == (255, 0, 0)
    image = decode(data)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (0, 128, 0)


def test_grey_and_bilevel_become_rgb():
    assert decode(encode(Image.new("L", (2, 2), 77), "PNG")).getpixel((1, 1)) == (77, 77, 77)
    assert decode(encode(Image.new("1", (2, 2), 1), "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    image, info = decode_with_info(data)
    assert info.frames == 2 and info.format == "GIF"
    assert image.mode == "RGB" and image.getpixel((4, 4)) == (255, 0, 0)


# --------------------------------------------------------------------------- orientation


def oriented_jpeg(orientation: int, width: int = 40, height: int = 24) -> bytes:
    """A grey JPEG with a red 8x8 block in its stored top-left corner."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def is_red(pixel: tuple[int, int, int]) -> bool:
    r, g, b = pixel
    return r > 200 and g < 60 and b < 60


def test_exif_orientation_6_rotates_clockwise_and_swaps_size():
    data = oriented_jpeg(6)
    image, info = decode_with_info(data)
    assert image.size == (24, 40)
    assert (info.width, info.height) == (24, 40)
    assert probe(data) == info
    # Orientation 6: the stored top row is displayed as the right column, so the
    # stored top-left corner ends up top-right.
    assert is_red(image.getpixel((20, 3)))
    assert not is_red(image.getpixel((3, 3)))
    assert not is_red(image.getpixel((20, 36)))


@pytest.mark.parametrize(
    ("orientation", "corner"),
    [(1, "tl"), (2, "tr"), (3, "br"), (4, "bl"), (5, "tl"), (7, "br"), (8, "bl")],
)
def test_every_exif_orientation_puts_the_corner_in_place(orientation, corner):
    image = decode(oriented_jpeg(orientation))
    w, h = image.size
    assert (w, h) == ((24, 40) if orientation >= 5 else (40, 24))
    points = {"tl": (3, 3), "tr": (w - 4, 3), "bl": (3, h - 4), "br": (w - 4, h - 4)}
    assert [name for name, xy in points.items() if is_red(image.getpixel(xy))] == [corner]


# --------------------------------------------------------------------------- draft


def test_draft_decodes_a_large_jpeg_smaller_but_at_least_the_asked_size():
    data = encode(photo(800, 600), "JPEG", quality=90)
    image, info = decode_with_info(data, draft=(100, 100))
    assert (info.width, info.height) == (800, 600)
    assert image.mode == "RGB"
    assert image.size == (200, 150)  # 1/4 scale: 1/8 would be smaller than asked
    full = np.asarray(decode(data).resize((200, 150), Image.Resampling.BOX), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - full).mean() < 3


def test_draft_size_is_in_displayed_pixels_for_rotated_jpegs():
    img = photo(800, 400)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(img, "JPEG", quality=90, exif=exif.tobytes())
    image, info = decode_with_info(data, draft=(100, 200))
    assert (info.width, info.height) == (400, 800)
    w, h = image.size
    assert w >= 100 and h >= 200 and w * h < 400 * 800 / 3
    assert w < h


def test_draft_is_ignored_for_png():
    assert decode(encode(photo(300, 200), "PNG"), draft=(50, 50)).size == (300, 200)


def _grey_cases() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    la = Image.new("LA", (4, 2))
    la.putdata([(0, 0), (0, 255), (200, 128), (50, 255)] * 2)
    return {
        "ycbcr_jpeg": encode(photo(300, 200), "JPEG", quality=90),
        "rotated_jpeg": encode(photo(80, 40), "JPEG", quality=90, exif=exif.tobytes()),
        "grey_jpeg": encode(photo(60, 40).convert("L"), "JPEG", quality=90),
        "cmyk_jpeg": encode(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95),
        "rgb_png": encode(photo(50, 30), "PNG"),
        "la_png": encode(la, "PNG"),
        "16_bit_png": encode(Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)), "PNG"),
    }


@pytest.mark.parametrize("case", sorted(_grey_cases()))
def test_grey_decode_is_the_rgb_decode_in_grey(case):
    """mode="L": JPEGs decode their luma plane; everything else goes through the RGB path."""
    data = _grey_cases()[case]
    grey, info = decode_with_info(data, mode="L")
    rgb, rgb_info = decode_with_info(data)
    assert grey.mode == "L" and grey.size == rgb.size and info == rgb_info
    diff = np.abs(np.asarray(grey, np.int16) - np.asarray(rgb.convert("L"), np.int16))
    if case.endswith("jpeg") and case != "cmyk_jpeg":
        # Equal up to libjpeg's rounding of the colour conversion it skips (and its
        # clamping of saturated colours, which moves a rare pixel a few levels).
        assert diff.mean() < 0.05 and (diff > 2).mean() < 0.005 and diff.max() <= 16
    else:
        assert diff.max() == 0
    reduced = decode(data, mode="L", draft=(40, 40))
    assert reduced.mode == "L" and min(reduced.size) >= min(40, *rgb.size)


def test_grey_decode_refuses_other_modes():
    with pytest.raises(ValueError, match="mode"):
        decode(encode(photo(), "PNG"), mode="CMYK")


def test_draft_must_be_positive():
    with pytest.raises(ValueError):
        decode(encode(photo(), "JPEG"), draft=(0, 10))


# --------------------------------------------------------------------------- API


def test_probe_reads_the_header_without_decoding_pixels():
    data = encode(photo(64, 48), "JPEG")
    assert probe(data) == ImageInfo(format="JPEG", width=64, height=48, mode="RGB", frames=1)
    # The header is intact, so probe accepts a body that decode rejects.
    truncated = data[: len(data) - 200]
    assert probe(truncated).width == 64
    assert reason_of(truncated) == "truncated"


def test_decode_array_is_a_writable_rgb_array():
    array = decode_array(encode(photo(10, 6), "PNG"))
    assert array.shape == (6, 10, 3) and array.dtype == np.uint8
    array[0, 0] = 0  # callers may normalise in place
    assert array.flags.writeable


def test_image_error_carries_reason_uri_and_survives_pickling():
    with pytest.raises(ImageError) as info:
        decode(b"", uri="gs://bucket/cats/a.jpg")
    err = info.value
    assert isinstance(err, KaedamaError)
    assert err.reason == "empty" and err.uri == "gs://bucket/cats/a.jpg"
    assert "gs://bucket/cats/a.jpg" in str(err) and "[empty]" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.uri, str(copy)) == (err.reason, err.uri, str(err))
    assert err.with_uri("x.jpg").uri == "x.jpg"
    assert set(REASONS) == {
        "empty",
        "truncated",
        "not_an_image",
        "too_large",
        "unsupported_mode",
        "corrupt",
    }
    with pytest.raises(ValueError):
        ImageError("weird", "not a reason")


def test_non_bytes_input_is_a_programming_error():
    with pytest.raises(TypeError):
        decode("cat.jpg")  # type: ignore[arg-type]


SEEDS = {
    "jpeg": encode(photo(24, 16), "JPEG", quality=80),
    "png": encode(photo(24, 16), "PNG"),
    "gif": encode(photo(24, 16).convert("P"), "GIF"),
    "webp": encode(photo(24, 16), "WEBP"),
    "tiff": encode(photo(24, 16), "TIFF"),
    "bmp": encode(photo(24, 16), "BMP"),
}


# Damaged headers make PIL warn (corrupt EXIF, huge announced sizes) before we refuse them.
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000),
)
def test_damaged_bytes_give_an_image_or_an_image_error(kind, edits, cut):
    """Whatever the damage, decode returns RGB or raises ImageError, nothing else."""
    data = bytearray(SEEDS[kind])
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: max(cut % (len(data) + 1), 0)]) if cut % 3 == 0 else bytes(data)
    try:
        image = decode(data, max_pixels=1_000_000)
    except ImageError as exc:
        assert exc.reason in REASONS
    else:
        assert image.mode == "RGB" and image.width * image.height <= 1_000_000


# --------------------------------------------------------------------------- real photos


@pytest.mark.shared
def test_every_real_photo_decodes_to_upright_rgb(shared_datasets):
    root = shared_datasets / "hymenoptera"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) == 398
    for path in files:
        image, info = decode_with_info(path.read_bytes(), uri=str(path))
        assert image.mode == "RGB" and image.size == (info.width, info.height)
    placeholder = decode_with_info((root / "train/ants/imageNotFound.gif").read_bytes())[1]
    assert placeholder.format == "GIF"


@pytest.mark.shared
def test_real_extensionless_and_grey_jpegs(shared_datasets):
    root = shared_datasets / "caltech101"
    info = probe((root / "BACKGROUND_Google/tmp").read_bytes())
    assert info.format == "JPEG" and info.width * info.height > 0
    data = (root / "BACKGROUND_Google/image_0006.jpg").read_bytes()
    image, info = decode_with_info(data)
    assert (info.mode, info.width, info.height) == ("L", 700, 889)
    array = np.asarray(image)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
    # Draft decode of a real photo: at least the asked size, close to a resized full decode.
    small = decode(data, draft=(128, 128))
    assert small.size == (175, 223)  # 1/4 scale, rounded up; 1/8 would be under 128
    reference = np.asarray(image.reduce(4), dtype=np.int16)  # 4x4 block means
    assert reference.shape == (223, 175, 3)
    assert np.abs(np.asarray(small, dtype=np.int16) - reference).mean() < 2
