"""Per-image fingerprints: sha256, size, perceptual hash and a second similarity signal.

Hash recipe
    Every perceptual hash comes from one :class:`HashRecipe` (algorithm, hash size,
    method, reduced or full decode). Its :meth:`HashRecipe.key` names the recipe
    together with the library versions that shape the bits, so hashes made by
    different recipes are never compared: the manifest header records the key once and
    the hash cache is keyed by it.

Methods
    ``imagehash`` (bit-compatible): :data:`HASHERS` wraps the ``imagehash`` functions
    themselves, so a hash equals ``int(str(imagehash.phash(img)), 16)`` bit for bit
    (first DCT coefficient = most significant bit). With ``reduced_decode=False`` the
    image is fully decoded by :func:`kaedama.images.decode`: this is the reference
    recipe, the hash imgdupes and imagededup compute.

    ``exact``: imagehash's pHash definition (grayscale, Lanczos resize to a
    ``4 * hash_size`` square, the ``hash_size x hash_size`` lowest 2-D DCT-II
    frequencies compared with their median) computed by kaedama, with the DCT as two
    small matrix products instead of imagehash's FFT calls. Its bits equal
    ``imagehash.phash`` of the same decoded image on every photo tested (tests, and
    all of Caltech-101 in ``bench/bench_planted.py``), flat images included.
    Floating-point rounding differs between the two DCTs, so a coefficient within
    ~1e-6 of the median could in principle compare differently: the recipe has its
    own key and never mixes.

    ``fast`` (the default): the same pHash definition on a cheaper path to the 32x32
    square. Colour JPEGs decode their luma plane only (no chroma upsampling, no colour
    conversion: the luma *is* the grayscale image, up to libjpeg's rounding), and the
    resize is Pillow's two-step one: an integer box reduction to at least
    :data:`REDUCING_GAP` times the square, then the Lanczos filter (Pillow's
    ``reducing_gap``, "indistinguishable from fair resampling in most cases" at 3).
    ~1.7x the speed of ``exact`` on ~300 px photos; 91% of Caltech-101's hashes equal
    the reference's bit for bit and 99.8% are within 2 bits, and recall on planted
    copies equals the reference's (``bench/bench_planted.py``, BENCHMARKS.md).
    Other algorithms use imagehash's functions under every method.

    ``reduced_decode=True`` asks libjpeg for a DCT-scaled decode (Pillow ``draft``)
    that is still at least ``draft_size`` pixels on each side (1/2, 1/4 or 1/8 scale).
    Entropy decoding stays, but the inverse DCT, colour conversion and everything after
    work on a quarter to a sixty-fourth of the pixels. For non-JPEG inputs decoding is
    the same under both settings. Agreement with the reference recipe and recall on
    planted copies are measured in ``bench/bench_planted.py`` (see BENCHMARKS.md).

Second signal
    Computed only for the images that the hash search pairs up (:func:`describe_bytes`
    on a colour decode), since only candidate pairs need confirming: most images never
    pay for it. :func:`descriptor` stores a 32x32 grayscale and an 8x8 RGB thumbnail
    (1,216 bytes);
    :func:`descriptor_similarities` scores a pair by the minimum of (a) the correlation
    of the thumbnails' high-pass detail, best over small zooms and shifts, and (b) the
    correlation of the colour thumbnails. phash keeps only the signs of the 8x8 lowest
    DCT frequencies of a grayscale image; the detail layer is exactly the part it
    throws away, and colour is invisible to it, so look-alikes that share a phash
    (different motorbikes on white, a recoloured logo) score low while resized,
    re-encoded, brightened or slightly cropped copies of one photo score high.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Protocol

import imagehash
import numpy as np
import PIL
from PIL import Image

from kaedama import images


class FingerprintCache(Protocol):
    """Where :func:`hash_image_bytes` looks up and stores results (a ``HashCache``).

    A protocol, so that this module does not import the cache that imports it.
    """

    def get(self, sha256: str, recipe: HashRecipe | str) -> tuple | None: ...

    def put(
        self,
        sha256: str,
        recipe: HashRecipe | str,
        width: int,
        height: int,
        hash: int,
        descriptor: bytes,
    ) -> None: ...


# The reduced decode keeps at least this many pixels per side (and at least twice the
# 4 * hash_size square the hash resamples to). At 256 px a photo under 512 px decodes
# in full, so its bits equal the reference's, while a 12 MP phone photo decodes at 1/8.
# 64 px (half-scale decode of ~300 px photos, 2x faster) costs measurable recall on
# planted copies (BENCHMARKS.md), so it is an option, not the default.
DRAFT_SIZE = 256
METHODS = ("fast", "exact", "imagehash")
# The fast method's two-step resize: box-reduce by an integer factor while the image
# stays at least this many times the hash square, then Lanczos (Pillow's reducing_gap).
REDUCING_GAP = 3.0
# Second signal: a grayscale thumbnail for detail and a coarser RGB one for colour.
DETAIL_SIZE = 32
COLOUR_SIZE = 8
DETAIL_ZOOMS = (1.0, 1.03, 1.06)
DETAIL_SHIFTS = (-1, 0, 1)
_GRAY_BYTES = DETAIL_SIZE * DETAIL_SIZE
DESCRIPTOR_BYTES = _GRAY_BYTES + COLOUR_SIZE * COLOUR_SIZE * 3
DESCRIPTOR_VERSION = f"g{DETAIL_SIZE}c{COLOUR_SIZE}"


def _bits_to_int(bits: np.ndarray) -> int:
    """Pack a boolean hash array into an int, first element = most significant bit."""
    flat = np.asarray(bits, dtype=bool).ravel()
    value = 0
    for byte in np.packbits(flat).tolist():
        value = (value << 8) | byte
    # packbits pads the last byte with zeros on the right; drop that padding.
    return value >> ((-flat.size) % 8)


def _phash(image: Image.Image, hash_size: int) -> int:
    return _bits_to_int(imagehash.phash(image, hash_size=hash_size).hash)


def _ahash(image: Image.Image, hash_size: int) -> int:
    return _bits_to_int(imagehash.average_hash(image, hash_size=hash_size).hash)


def _dhash(image: Image.Image, hash_size: int) -> int:
    return _bits_to_int(imagehash.dhash(image, hash_size=hash_size).hash)


def _whash(image: Image.Image, hash_size: int) -> int:
    return _bits_to_int(imagehash.whash(image, hash_size=hash_size).hash)


# One registry: algorithm name -> (RGB image, hash_size) -> hash as an int with
# hash_size**2 bits, in imagehash's bit order.
HASHERS: dict[str, Callable[[Image.Image, int], int]] = {
    "phash": _phash,
    "ahash": _ahash,
    "dhash": _dhash,
    "whash": _whash,
}


class HashingError(ValueError):
    """A hash recipe is not valid (unknown algorithm or unsupported size)."""


@dataclass(frozen=True)
class HashRecipe:
    """How a perceptual hash is made; hashes from different recipes are never compared.

    Attributes:
        algorithm: key of :data:`HASHERS` (phash, ahash, dhash, whash).
        hash_size: side of the bit grid; the hash has ``hash_size ** 2`` bits.
        reduced_decode: decode JPEGs at a reduced size (>= ``draft_size`` per side) first.
        method: ``fast`` (luma decode, two-step resize), ``exact`` (kaedama's
            bit-exact implementation of imagehash's pHash) or ``imagehash``
            (imagehash's own functions); see the module docstring. Only pHash has
            kaedama implementations.
        draft_size: the reduced decode's minimum side in pixels.
    """

    algorithm: str = "phash"
    hash_size: int = 8
    reduced_decode: bool = True
    method: str = "fast"
    draft_size: int = DRAFT_SIZE

    def __post_init__(self) -> None:
        if self.algorithm not in HASHERS:
            raise HashingError(
                f"unknown hash algorithm {self.algorithm!r}; choose one of {sorted(HASHERS)}"
            )
        if self.hash_size < 2:
            raise HashingError(f"hash_size must be >= 2, got {self.hash_size}")
        if self.algorithm == "whash" and self.hash_size & (self.hash_size - 1):
            raise HashingError(f"whash needs a power-of-two hash_size, got {self.hash_size}")
        if self.method not in METHODS:
            raise HashingError(f"unknown hash method {self.method!r}; choose one of {METHODS}")
        if self.draft_size < 1:
            raise HashingError(f"draft_size must be >= 1, got {self.draft_size}")

    @property
    def bits(self) -> int:
        """Number of bits in a hash."""
        return self.hash_size * self.hash_size

    @property
    def fast(self) -> bool:
        """True when kaedama's own pHash implementation makes the hash (fast or exact)."""
        return self.method in ("fast", "exact") and self.algorithm == "phash"

    @property
    def luma(self) -> bool:
        """True when the hash is made from a grayscale (luma) decode: the fast method."""
        return self.method == "fast" and self.algorithm == "phash"

    @property
    def draft(self) -> tuple[int, int] | None:
        """The reduced-decode target size handed to the decoder, or None for a full decode."""
        if not self.reduced_decode:
            return None
        side = max(self.draft_size, 8 * self.hash_size)
        return (side, side)

    def key(self) -> str:
        """A stable name for the recipe and the libraries that shape its bits.

        Cached per recipe: the hash cache asks for it once per file.

        E.g. ``phash8-draft256-luma-gap3-g32c8-dct-pillow12.3.0`` (fast),
        ``phash8-draft256-g32c8-dct-pillow12.3.0`` (exact) or
        ``phash8-full-g32c8-imagehash4.3.2-pillow12.3.0`` (the imagehash reference).
        """
        return _recipe_key(self)

    def to_dict(self) -> dict:
        """The recipe's fields plus its key, for manifest headers and reports."""
        return {**asdict(self), "key": self.key()}


@lru_cache(maxsize=64)
def _recipe_key(recipe: HashRecipe) -> str:
    """:meth:`HashRecipe.key`, computed once per recipe."""
    decode = f"draft{recipe.draft[0]}" if recipe.draft else "full"
    if recipe.luma:
        decode += f"-luma-gap{REDUCING_GAP:g}"
    if recipe.fast:
        return (
            f"{recipe.algorithm}{recipe.hash_size}-{decode}-{DESCRIPTOR_VERSION}"
            f"-dct-pillow{PIL.__version__}"
        )
    return (
        f"{recipe.algorithm}{recipe.hash_size}-{decode}-{DESCRIPTOR_VERSION}"
        f"-imagehash{imagehash.__version__}-pillow{PIL.__version__}"
    )


def hash_to_hex(h: int, bits: int = 64) -> str:
    """Hex string of a hash, zero-padded to ``bits / 4`` characters (imagehash's format)."""
    return format(h, f"0{(bits + 3) // 4}x")


def hex_to_hash(s: str) -> int:
    """Inverse of :func:`hash_to_hex`."""
    return int(s, 16)


def descriptor(image: Image.Image) -> bytes:
    """The second similarity signal of one image (DESCRIPTOR_BYTES bytes).

    A DETAIL_SIZE^2 grayscale thumbnail followed by a COLOUR_SIZE^2 RGB thumbnail,
    both by area averaging.
    """
    gray = image.convert("L").resize((DETAIL_SIZE, DETAIL_SIZE), Image.Resampling.BOX)
    return gray.tobytes() + _colour_thumbnail(image)


def _colour_thumbnail(image: Image.Image) -> bytes:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((COLOUR_SIZE, COLOUR_SIZE), Image.Resampling.BOX).tobytes()


@lru_cache(maxsize=8)
def _dct_rows(size: int, keep: int) -> np.ndarray:
    """The first ``keep`` rows of the unnormalised DCT-II matrix of order ``size``.

    Same scaling as ``scipy.fftpack.dct`` (type II, no normalisation), which imagehash
    uses; the hash compares coefficients with their median, so scale never matters.
    """
    n = np.arange(size)
    k = np.arange(keep)[:, None]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * size))


def phash_of_square(square: np.ndarray, hash_size: int) -> int:
    """pHash bits of a ``4 * hash_size`` square grayscale array (imagehash's definition).

    The ``hash_size x hash_size`` lowest frequencies of the 2-D DCT-II, each compared
    with their median; first coefficient = most significant bit.
    """
    rows = _dct_rows(square.shape[0], hash_size)
    # Rounded so that coefficients that are zero in exact arithmetic (flat or symmetric
    # images) are exactly zero, as scipy's FFT-based DCT gives them, not rounding noise.
    low = np.round(rows @ np.asarray(square, dtype=np.float64) @ rows.T, 6).ravel()
    ordered = np.sort(low)
    mid = low.size // 2
    median = ordered[mid] if low.size % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return _bits_to_int(low > median)


def _fast_phash(gray: Image.Image, hash_size: int, reducing_gap: float | None) -> int:
    """kaedama's pHash of a grayscale image (imagehash's definition; see the module doc)."""
    side = 4 * hash_size
    square = gray.resize((side, side), Image.Resampling.LANCZOS, reducing_gap=reducing_gap)
    return phash_of_square(np.asarray(square), hash_size)


def _centred(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> zero-mean, unit-norm float32 rows, and a mask of rows with no variance."""
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    flat = norm[:, 0] <= 1e-3
    return np.divide(x, norm, out=np.zeros_like(x), where=~flat[:, None]), flat


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation; two flat rows score 1, one flat row 0."""
    ca, flat_a = _centred(a)
    cb, flat_b = _centred(b)
    sim = np.einsum("ij,ij->i", ca, cb)
    sim[flat_a & flat_b] = 1.0
    return sim


def _axis_warp(zoom: float, shift: int) -> np.ndarray:
    """``W`` with ``W @ x`` = ``x`` zoomed about its centre and shifted, bilinear, along axis 0.

    Each output row takes two neighbouring input rows; positions are clamped to the
    edges. A zoom/shift of the whole thumbnail is ``Wy @ img @ Wx.T``: bilinear
    interpolation is separable.
    """
    c = (DETAIL_SIZE - 1) / 2
    pos = np.clip((np.arange(DETAIL_SIZE) - c) / zoom + c + shift, 0, DETAIL_SIZE - 1)
    low = np.minimum(np.floor(pos).astype(np.int64), DETAIL_SIZE - 2)
    frac = pos - low
    w = np.zeros((DETAIL_SIZE, DETAIL_SIZE), dtype=np.float64)
    rows = np.arange(DETAIL_SIZE)
    w[rows, low] += 1 - frac
    w[rows, low + 1] += frac
    return w.astype(np.float32)


@lru_cache(maxsize=1)
def _warps() -> list[tuple[np.ndarray, np.ndarray]]:
    """``(Wy, Wx)`` of every zoom/shift tried by the detail match."""
    return [
        (_axis_warp(zoom, dy), _axis_warp(zoom, dx))
        for zoom in DETAIL_ZOOMS
        for dy in DETAIL_SHIFTS
        for dx in DETAIL_SHIFTS
    ]


@lru_cache(maxsize=4)
def _box5_matrix(size: int) -> np.ndarray:
    """``M`` with ``M @ x`` = the 5-tap mean of ``x`` along its first axis, edges replicated."""
    m = np.zeros((size, size), dtype=np.float32)
    for i in range(size):
        for k in range(i - 2, i + 3):
            m[i, min(max(k, 0), size - 1)] += 0.2
    return m


def _box5(img: np.ndarray) -> np.ndarray:
    """5x5 local mean of each ``(n, h, w)`` image, edges replicated (two small matmuls)."""
    return _box5_matrix(img.shape[1]) @ img @ _box5_matrix(img.shape[2]).T


def _detail(img: np.ndarray) -> np.ndarray:
    """High-pass layer (thumbnail minus its 5x5 local mean): what a low-frequency hash ignores.

    ``(n, h, w)`` thumbnails in, ``(n, h * w)`` rows out.
    """
    return (img - _box5(img)).reshape(len(img), -1)


def _aligned_detail_similarity(ga: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """Best detail correlation over small zooms and shifts of either image onto the other."""
    ia = ga.reshape(-1, DETAIL_SIZE, DETAIL_SIZE)
    ib = gb.reshape(-1, DETAIL_SIZE, DETAIL_SIZE)
    da, db = _detail(ia), _detail(ib)
    best = np.full(len(ga), -1.0, dtype=np.float32)
    for wy, wx in _warps():
        # Warp the thumbnail first, then take its detail: interpolating a high-pass
        # layer would blur exactly the detail being compared.
        for fixed, moving in ((da, ib), (db, ia)):
            warped = wy @ moving @ wx.T
            np.maximum(best, _correlation(fixed, _detail(warped)), out=best)
    return best


def descriptor_similarity(a: bytes, b: bytes) -> float:
    """Similarity in [-1, 1] of two descriptors; see :func:`descriptor_similarities`."""
    return float(descriptor_similarities([a], [b])[0])


def descriptor_similarities(
    a: Sequence[bytes], b: Sequence[bytes], *, chunk: int = 2048
) -> np.ndarray:
    """Similarity of aligned pairs of descriptors, vectorised.

    The score is the minimum of two correlations, so both must agree:

    * detail: the high-pass layer of the grayscale thumbnails, matched over zooms of up
      to 6% and shifts of one thumbnail pixel (crops, small re-framings);
    * colour: the RGB thumbnails over all channels jointly (a recoloured look-alike
      with the same shapes fails here).

    Both are unchanged by a global brightness/contrast gain. Flat images (no detail)
    match each other and nothing else.
    """
    if len(a) != len(b):
        raise ValueError("descriptor lists differ in length")
    out = np.zeros(len(a), dtype=np.float32)
    for start in range(0, len(a), chunk):
        xa = _descriptor_rows(a[start : start + chunk])
        xb = _descriptor_rows(b[start : start + chunk])
        ga, gb = xa[:, :_GRAY_BYTES], xb[:, :_GRAY_BYTES]
        colour = _correlation(xa[:, _GRAY_BYTES:], xb[:, _GRAY_BYTES:])
        detail = _aligned_detail_similarity(ga, gb)
        out[start : start + len(xa)] = np.minimum(colour, detail)
    return np.clip(out, -1.0, 1.0)


def _descriptor_rows(descs: Sequence[bytes]) -> np.ndarray:
    if any(len(d) != DESCRIPTOR_BYTES for d in descs):
        raise ValueError(
            f"descriptors must be {DESCRIPTOR_BYTES} bytes ({DESCRIPTOR_VERSION}); "
            "were they made by another kaedama version?"
        )
    raw = np.frombuffer(b"".join(descs), dtype=np.uint8).reshape(len(descs), DESCRIPTOR_BYTES)
    return raw.astype(np.float32)


@dataclass(frozen=True)
class ImageRecord:
    """What the dedup stage knows about one readable image.

    ``descriptor`` (the second signal) is empty until :func:`describe_bytes` has been
    run for the image: only images in candidate pairs need one. ``taken``, ``make``,
    ``model`` and ``gps`` are what the EXIF header says (:class:`kaedama.images.Exif`;
    ``gps`` only when asked for, since it is personal data).
    """

    uri: str
    label: str
    sha256: str
    bytes: int
    width: int
    height: int
    hash: int
    descriptor: bytes = b""
    mtime: float = 0.0
    taken: str = ""
    make: str = ""
    model: str = ""
    gps: tuple[float, float] | None = None


def hash_decoded(image: Image.Image, recipe: HashRecipe) -> int:
    """Perceptual hash of an already decoded image (grayscale for the fast method, else RGB)."""
    if recipe.luma:
        gray = image if image.mode == "L" else image.convert("L")
        return _fast_phash(gray, recipe.hash_size, REDUCING_GAP)
    if recipe.fast:
        return _fast_phash(image.convert("L"), recipe.hash_size, None)
    return HASHERS[recipe.algorithm](image, recipe.hash_size)


def hash_image_bytes(
    uri: str,
    label: str,
    data: bytes,
    recipe: HashRecipe,
    *,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    mtime: float = 0.0,
    cache: FingerprintCache | None = None,
    describe: bool = False,
    keep_gps: bool = False,
) -> ImageRecord:
    """Fingerprint one image's bytes with the shared decoder.

    Args:
        uri, label: carried into the record.
        data: the file's bytes.
        recipe: how to make the perceptual hash.
        max_pixels: decompression-bomb guard handed to the decoder.
        mtime: modification time, used by the ``oldest`` keep policy.
        cache: optional :class:`kaedama.dedup.hashcache.HashCache`; a hit skips the decode
            (and brings the descriptor when an earlier run stored one), a miss stores
            the new result.
        describe: also compute the second-signal descriptor (:func:`describe_bytes`).
            The dedup job leaves it for later and describes only the images that the
            hash search pairs up.
        keep_gps: keep the EXIF GPS position (personal data: off unless asked for).

    Returns:
        The :class:`ImageRecord`; width/height are the full (EXIF-oriented) size. Its
        descriptor is empty unless ``describe`` or the cache held one. The EXIF facts
        come from the header the decode reads (a cache hit reads the header alone).

    Raises:
        kaedama.images.ImageError: the bytes are not a readable image.
    """
    sha = hashlib.sha256(data).hexdigest()
    hit = cache.get(sha, recipe) if cache is not None else None
    if hit is not None:
        width, height, h, desc = hit
        exif = images.probe(data, max_pixels=max_pixels, uri=uri).exif
    else:
        image, info = images.decode_with_info(
            data,
            max_pixels=max_pixels,
            draft=recipe.draft,
            uri=uri,
            mode="L" if recipe.luma else "RGB",
        )
        width, height, h, desc = info.width, info.height, hash_decoded(image, recipe), b""
        exif = info.exif
    if describe and not desc:
        desc = describe_bytes(data, max_pixels=max_pixels, uri=uri)
    if cache is not None and (hit is None or desc != hit.descriptor):
        cache.put(sha, recipe, width, height, h, desc)
    return ImageRecord(
        uri,
        label,
        sha,
        len(data),
        width,
        height,
        h,
        desc,
        mtime,
        taken=exif.taken,
        make=exif.make,
        model=exif.model,
        gps=exif.gps if keep_gps else None,
    )


def describe_bytes(
    data: bytes, *, max_pixels: int = images.DEFAULT_MAX_PIXELS, uri: str | None = None
) -> bytes:
    """The second-signal :func:`descriptor` of one image's bytes (a colour decode).

    The decode is reduced to >= :data:`DRAFT_SIZE` pixels per side, more than the
    32x32 and 8x8 thumbnails need, whatever the hash recipe: descriptors of all
    recipes are comparable.

    Raises:
        kaedama.images.ImageError: the bytes are not a readable image.
    """
    return descriptor(decode_for_description(data, max_pixels=max_pixels, uri=uri))


def decode_for_description(
    data: bytes, *, max_pixels: int = images.DEFAULT_MAX_PIXELS, uri: str | None = None
) -> Image.Image:
    """The colour decode the second signals start from (reduced to >= DRAFT_SIZE a side).

    Shared by :func:`describe_bytes` and the keypoint test
    (:func:`kaedama.dedup.sameshot.features`), so one decode can serve both.
    """
    return images.decode(data, max_pixels=max_pixels, draft=(DRAFT_SIZE, DRAFT_SIZE), uri=uri)
