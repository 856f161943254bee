"""Per-image fingerprints: sha256, size, perceptual hash and a second similarity signal.

Hash recipe
    Every perceptual hash comes from one :class:`HashRecipe` (algorithm, hash size,
    reduced or full decode). Its :meth:`HashRecipe.key` names the recipe together with
    the imagehash and Pillow versions, so hashes made by different recipes are never
    compared: the manifest header records the key once and the hash cache is keyed by it.

Bit compatibility
    :data:`HASHERS` wraps the ``imagehash`` functions themselves, so a hash equals
    ``int(str(imagehash.phash(img)), 16)`` bit for bit (first DCT coefficient = most
    significant bit). The reference recipe is ``reduced_decode=False``: the image is
    fully decoded by :func:`kaedama.images.decode` and hashed. The fast path
    (``reduced_decode=True``) asks libjpeg for a DCT-scaled decode (Pillow ``draft``)
    that is still at least :data:`DRAFT_SIZE` pixels on each side; the hash then
    resamples that smaller image. For non-JPEG inputs both recipes are identical. How
    often the two agree bit for bit is measured in ``bench/bench_planted.py``.

Second signal
    :func:`descriptor` is a 16x16 RGB thumbnail (768 bytes) made by area averaging; two
    images are compared with :func:`descriptor_similarity`, the Pearson correlation of
    the two thumbnails over all three channels jointly. It depends on the pixel
    values and the colours, which the sign pattern of a grayscale DCT (phash) ignores,
    and it is unchanged by a global brightness/contrast gain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import imagehash
import numpy as np
import PIL
from PIL import Image

from kaedama import images

if TYPE_CHECKING:
    from kaedama.hashcache import HashCache

# The reduced decode keeps at least this many pixels per side before the hash resamples
# to 4 * hash_size. Chosen in bench/bench_planted.py: large enough that the fast path
# agrees with the full decode on nearly every image, small enough that a 12 MP phone
# photo decodes at 1/8 scale.
DRAFT_SIZE = 256
DESCRIPTOR_SIZE = 16
DESCRIPTOR_VERSION = f"rgb{DESCRIPTOR_SIZE}"


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
        reduced_decode: decode JPEGs at a reduced size (>= DRAFT_SIZE per side) first.
    """

    algorithm: str = "phash"
    hash_size: int = 8
    reduced_decode: bool = True

    def __post_init__(self) -> None:
        if self.algorithm not in HASHERS:
            raise HashingError(
                f"unknown hash algorithm {self.algorithm!r}; choose one of {sorted(HASHERS)}"
            )
        if self.hash_size < 2:
            raise HashingError(f"hash_size must be >= 2, got {self.hash_size}")
        if self.algorithm == "whash" and self.hash_size & (self.hash_size - 1):
            raise HashingError(f"whash needs a power-of-two hash_size, got {self.hash_size}")

    @property
    def bits(self) -> int:
        """Number of bits in a hash."""
        return self.hash_size * self.hash_size

    @property
    def draft(self) -> tuple[int, int] | None:
        """The reduced-decode target size handed to the decoder, or None for a full decode."""
        if not self.reduced_decode:
            return None
        side = max(DRAFT_SIZE, 4 * self.hash_size)
        return (side, side)

    def key(self) -> str:
        """A stable name for the recipe, e.g. ``phash8-draft256-rgb16-imagehash4.3.2-pillow12.3.0``."""
        decode = f"draft{self.draft[0]}" if self.draft else "full"
        return (
            f"{self.algorithm}{self.hash_size}-{decode}-{DESCRIPTOR_VERSION}"
            f"-imagehash{imagehash.__version__}-pillow{PIL.__version__}"
        )

    def to_dict(self) -> dict:
        """The recipe's fields plus its key, for manifest headers and reports."""
        return {**asdict(self), "key": self.key()}


def hash_to_hex(h: int, bits: int = 64) -> str:
    """Hex string of a hash, zero-padded to ``bits / 4`` characters (imagehash's format)."""
    return format(h, f"0{(bits + 3) // 4}x")


def hex_to_hash(s: str) -> int:
    """Inverse of :func:`hash_to_hex`."""
    return int(s, 16)


def descriptor(image: Image.Image) -> bytes:
    """The second similarity signal: a DESCRIPTOR_SIZE^2 RGB thumbnail by area averaging."""
    thumb = image.convert("RGB").resize(
        (DESCRIPTOR_SIZE, DESCRIPTOR_SIZE), Image.Resampling.BOX
    )
    return thumb.tobytes()


def _centred(desc: np.ndarray) -> np.ndarray:
    """Rows of uint8 descriptors -> zero-mean, unit-norm float32 rows (flat images -> 0)."""
    x = desc.astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-6)


def descriptor_similarity(a: bytes, b: bytes) -> float:
    """Pearson correlation in [-1, 1] of two descriptors over all channels jointly.

    Two flat images (no variance) are identical in this signal and score 1.0; a flat
    image against a textured one scores 0.0.
    """
    return float(descriptor_similarities([a], [b])[0])


def descriptor_similarities(a: list[bytes], b: list[bytes]) -> np.ndarray:
    """Vectorised :func:`descriptor_similarity` for aligned lists of descriptors."""
    if len(a) != len(b):
        raise ValueError("descriptor lists differ in length")
    if not a:
        return np.zeros(0, dtype=np.float32)
    xa = np.frombuffer(b"".join(a), dtype=np.uint8).reshape(len(a), -1)
    xb = np.frombuffer(b"".join(b), dtype=np.uint8).reshape(len(b), -1)
    if xa.shape != xb.shape:
        raise ValueError("descriptors of different sizes cannot be compared")
    ca, cb = _centred(xa), _centred(xb)
    sim = np.einsum("ij,ij->i", ca, cb)
    flat_a = ~ca.any(axis=1)
    flat_b = ~cb.any(axis=1)
    sim[flat_a & flat_b] = 1.0
    return np.clip(sim, -1.0, 1.0)


@dataclass(frozen=True)
class ImageRecord:
    """What the dedup stage knows about one readable image."""

    uri: str
    label: str
    sha256: str
    bytes: int
    width: int
    height: int
    hash: int
    descriptor: bytes
    mtime: float = 0.0


def hash_decoded(image: Image.Image, recipe: HashRecipe) -> tuple[int, bytes]:
    """Perceptual hash and descriptor of an already decoded RGB image."""
    return HASHERS[recipe.algorithm](image, recipe.hash_size), descriptor(image)


def hash_image_bytes(
    uri: str,
    label: str,
    data: bytes,
    recipe: HashRecipe,
    *,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    mtime: float = 0.0,
    cache: HashCache | None = None,
) -> ImageRecord:
    """Fingerprint one image's bytes with the shared decoder.

    Args:
        uri, label: carried into the record.
        data: the file's bytes.
        recipe: how to make the perceptual hash.
        max_pixels: decompression-bomb guard handed to the decoder.
        mtime: modification time, used by the ``oldest`` keep policy.
        cache: optional :class:`kaedama.hashcache.HashCache`; a hit skips the decode,
            a miss stores the new result.

    Returns:
        The :class:`ImageRecord`; width/height are the full (EXIF-oriented) size.

    Raises:
        kaedama.images.ImageError: the bytes are not a readable image.
    """
    sha = hashlib.sha256(data).hexdigest()
    if cache is not None:
        hit = cache.get(sha, recipe)
        if hit is not None:
            width, height, h, desc = hit
            return ImageRecord(uri, label, sha, len(data), width, height, h, desc, mtime)
    image, info = images.decode_with_info(
        data, max_pixels=max_pixels, draft=recipe.draft, uri=uri
    )
    h, desc = hash_decoded(image, recipe)
    if cache is not None:
        cache.put(sha, recipe, info.width, info.height, h, desc)
    return ImageRecord(uri, label, sha, len(data), info.width, info.height, h, desc, mtime)

