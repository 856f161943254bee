"""Perceptual hashes (bit-compatible with imagehash), descriptors and the hash cache."""

from __future__ import annotations

import io

import imagehash
import numpy as np
import PIL
import pytest
from PIL import Image, ImageEnhance

from kaedama import images
from kaedama.dedup import hashing
from kaedama.dedup.hashcache import HashCache, HashCacheError
from kaedama.dedup.hashing import (
    DESCRIPTOR_BYTES,
    HASHERS,
    HashingError,
    HashRecipe,
    descriptor,
    descriptor_similarity,
    hash_image_bytes,
    hash_to_hex,
    hex_to_hash,
    phash_of_square,
)

IMAGEHASH = {
    "phash": imagehash.phash,
    "ahash": imagehash.average_hash,
    "dhash": imagehash.dhash,
    "whash": imagehash.whash,
}


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(shared_datasets) -> list[bytes]:
    """Six real photos (ants and bees, about 500 px)."""
    paths = sorted((shared_datasets / "hymenoptera" / "val").glob("*/*.jpg"))
    return [p.read_bytes() for p in paths[::25][:6]]


@pytest.fixture(scope="module")
def large_photo(photos) -> bytes:
    """A 2000+ px JPEG upscaled from a real photo, so the reduced decode really reduces."""
    img = images.decode(photos[0])
    scale = 2400 / max(img.size)
    big = img.resize(
        (round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC
    )
    return _encode(big, quality=90)


@pytest.mark.shared
@pytest.mark.parametrize("algorithm", sorted(HASHERS))
@pytest.mark.parametrize("hash_size", [8, 16])
def test_hashers_match_imagehash_bits(photos, algorithm, hash_size):
    for data in photos[:3]:
        img = images.decode(data)
        reference = IMAGEHASH[algorithm](img, hash_size=hash_size)
        ours = HASHERS[algorithm](img, hash_size)
        assert hash_to_hex(ours, hash_size * hash_size) == str(reference)
        assert ours.bit_length() <= hash_size * hash_size


@pytest.mark.shared
def test_full_decode_recipe_is_imagehash_on_the_shared_decoder(photos, large_photo):
    recipe = HashRecipe(reduced_decode=False, method="imagehash")
    for data in [*photos, large_photo]:
        record = hash_image_bytes("u", "l", data, recipe)
        assert hash_to_hex(record.hash) == str(imagehash.phash(images.decode(data)))
        info = images.probe(data)
        assert (record.width, record.height) == (info.width, info.height)
        assert record.bytes == len(data) and len(record.sha256) == 64


@pytest.mark.shared
@pytest.mark.parametrize("method", ["fast", "exact", "imagehash"])
def test_reduced_decode_stays_close_and_reports_full_size(large_photo, photos, method):
    fast = hash_image_bytes("u", "l", large_photo, HashRecipe(method=method), describe=True)
    full = hash_image_bytes(
        "u", "l", large_photo, HashRecipe(reduced_decode=False, method=method), describe=True
    )
    assert (fast.width, fast.height) == (full.width, full.height)
    assert max(fast.width, fast.height) == 2400
    assert (fast.hash ^ full.hash).bit_count() <= 2
    # The descriptor does not depend on the recipe: one reduced colour decode.
    assert fast.descriptor == full.descriptor and len(fast.descriptor) == DESCRIPTOR_BYTES
    # A PNG has no reduced decode: both decodes give the same bits.
    png = _encode(images.decode(photos[1]), "PNG")
    a = hash_image_bytes("u", "l", png, HashRecipe(method=method))
    b = hash_image_bytes("u", "l", png, HashRecipe(reduced_decode=False, method=method))
    assert a.hash == b.hash and a.descriptor == b.descriptor == b""


@pytest.mark.shared
def test_exact_phash_gives_imagehash_bits(photos):
    for data in photos:
        img = images.decode(data)
        # The DCT/median implementation equals imagehash's on imagehash's own square...
        lanczos = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
        assert hash_to_hex(phash_of_square(np.asarray(lanczos), 8)) == str(imagehash.phash(img))
        big = img.convert("L").resize((64, 64), Image.Resampling.LANCZOS)
        assert hash_to_hex(phash_of_square(np.asarray(big), 16), 256) == str(
            imagehash.phash(img, hash_size=16)
        )
        # ...so the exact method gives imagehash's bits on the same decode.
        for reduced in (False, True):
            exact = hash_image_bytes(
                "u", "l", data, HashRecipe(reduced_decode=reduced, method="exact")
            )
            ref = hash_image_bytes(
                "u", "l", data, HashRecipe(reduced_decode=reduced, method="imagehash")
            )
            assert exact.hash == ref.hash


@pytest.mark.shared
def test_fast_phash_is_the_same_definition_on_the_luma_decode(photos):
    """The fast method = phash of the JPEG's luma plane, resized in two steps."""
    for data in photos:
        gray = images.decode(data, mode="L")
        square = gray.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=hashing.REDUCING_GAP)
        fast = hash_image_bytes("u", "l", data, HashRecipe(reduced_decode=False))
        assert fast.hash == phash_of_square(np.asarray(square), 8)
        # The luma plane is the grayscale image up to libjpeg's rounding, so the bits stay
        # within a couple of the reference's (bench_planted: ~90% equal on Caltech-101).
        reference = int(str(imagehash.phash(images.decode(data))), 16)
        assert (fast.hash ^ reference).bit_count() <= 3
        rgb_gray = np.asarray(images.decode(data).convert("L"), dtype=np.int16)
        diff = np.abs(np.asarray(gray, dtype=np.int16) - rgb_gray)
        assert diff.mean() < 0.2 and (diff > 2).mean() < 0.005


@pytest.mark.shared
def test_transformed_copies_stay_near_and_distinct_photos_stay_far(photos):
    recipe = HashRecipe()
    originals = [hash_image_bytes("u", "l", d, recipe, describe=True) for d in photos]
    img = images.decode(photos[2])
    w, h = img.size
    variants = {
        "half": img.resize((w // 2, h // 2), Image.Resampling.LANCZOS),
        "brighter": ImageEnhance.Brightness(img).enhance(1.1),
        "crop5": img.crop((w * 5 // 200, h * 5 // 200, w - w * 5 // 200, h - h * 5 // 200)),
    }
    for name, variant in {**variants, "q25": img}.items():
        data = _encode(variant, quality=25 if name == "q25" else 90)
        copy = hash_image_bytes("v", "l", data, recipe, describe=True)
        if name != "crop5":  # phash is not crop-invariant; bench_planted measures its recall
            assert (copy.hash ^ originals[2].hash).bit_count() <= 4, name
        assert descriptor_similarity(copy.descriptor, originals[2].descriptor) > 0.9, name
    for i, a in enumerate(originals):
        for b in originals[i + 1 :]:
            assert (a.hash ^ b.hash).bit_count() > 10
            assert descriptor_similarity(a.descriptor, b.descriptor) < 0.9


def test_fast_phash_gives_imagehash_bits_on_flat_and_symmetric_images():
    """Where imagehash's AC coefficients are exact zeros, the fast DCT must not add noise."""
    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)
    made = [Image.new("RGB", (100, 80), colour) for colour in ("gray", "black", "white", "teal")]
    made.append(Image.fromarray(np.concatenate([half, half[:, ::-1]], axis=1)))
    made.append(Image.fromarray(np.concatenate([half, half[::-1]], axis=0)))
    ramp = np.tile(np.arange(100, dtype=np.uint8), (80, 1))
    made.append(Image.fromarray(np.stack([ramp] * 3, axis=-1)))
    for img in made:
        data = _encode(img, "PNG")
        for method in ("fast", "exact"):
            ours = hash_image_bytes("u", "l", data, HashRecipe(method=method))
            assert hash_to_hex(ours.hash) == str(imagehash.phash(images.decode(data))), method


def test_descriptor_signal_on_made_images():
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    img = Image.fromarray(pattern).resize((256, 256), Image.Resampling.BILINEAR)
    d = descriptor(img)
    assert len(d) == DESCRIPTOR_BYTES
    brighter = Image.fromarray((np.asarray(img, dtype=np.float32) * 0.9).astype(np.uint8))
    assert descriptor_similarity(d, descriptor(brighter)) > 0.99
    # Same shapes in other colours: the colour-blind phash cannot tell, the descriptor can.
    swapped = Image.fromarray(np.asarray(img)[:, :, ::-1].copy())
    assert descriptor_similarity(d, descriptor(swapped)) < 0.9
    white = descriptor(Image.new("RGB", (50, 50), "white"))
    grey = descriptor(Image.new("RGB", (80, 30), (128, 128, 128)))
    assert descriptor_similarity(white, grey) == 1.0
    assert descriptor_similarity(white, d) <= 0.0


def test_box_filter_and_warps_equal_their_direct_definitions():
    """The descriptor's matrix forms of the 5x5 mean and the zoom/shift warps."""
    from scipy.ndimage import uniform_filter

    rng = np.random.default_rng(1)
    imgs = (rng.random((3, 32, 32)) * 255).astype(np.float32)
    box = uniform_filter(imgs, size=(1, 5, 5), mode="nearest")
    assert np.abs(hashing._box5(imgs) - box).max() < 1e-3
    # Bilinear sampling at zoomed/shifted positions, pixel by pixel, edges clamped.
    zoom, dy, dx = 1.06, 1, -1
    c = 31 / 2
    pos_y = np.clip((np.arange(32) - c) / zoom + c + dy, 0, 31)
    pos_x = np.clip((np.arange(32) - c) / zoom + c + dx, 0, 31)
    want = np.zeros((32, 32))
    for i, y in enumerate(pos_y):
        for j, x in enumerate(pos_x):
            y0, x0 = min(int(y), 30), min(int(x), 30)
            fy, fx = y - y0, x - x0
            patch = imgs[0, y0 : y0 + 2, x0 : x0 + 2]
            want[i, j] = np.array([1 - fy, fy]) @ patch @ np.array([1 - fx, fx])
    wy, wx = hashing._axis_warp(zoom, dy), hashing._axis_warp(zoom, dx)
    assert np.abs(wy @ imgs[0] @ wx.T - want).max() < 1e-3
    assert len(hashing._warps()) == 27


def test_hex_round_trip_and_recipe_keys():
    assert hash_to_hex(0xAB) == "00000000000000ab"
    assert hash_to_hex(1, 256) == "0" * 63 + "1"
    assert hex_to_hash(hash_to_hex(0xDEADBEEF12345678)) == 0xDEADBEEF12345678
    fast, full = HashRecipe(), HashRecipe(reduced_decode=False, method="imagehash")
    exact = HashRecipe(method="exact")
    keys = {
        fast.key(),
        exact.key(),
        full.key(),
        HashRecipe(method="imagehash").key(),
        HashRecipe(reduced_decode=False).key(),
        HashRecipe(draft_size=64).key(),
        HashRecipe(draft_size=64, method="exact").key(),
    }
    assert len(keys) == 7, "every recipe has its own key"
    assert f"imagehash{imagehash.__version__}" in full.key() and "pillow" in full.key()
    assert "imagehash" not in fast.key() and f"pillow{PIL.__version__}" in fast.key()
    assert fast.key().startswith("phash8-draft256-luma-gap3-g32c8-dct")
    # The exact method keeps the key of the recipe that was the default before, so its
    # hash caches stay valid.
    assert exact.key() == f"phash8-draft256-g32c8-dct-pillow{PIL.__version__}"
    assert full.key().startswith("phash8-full")
    assert HashRecipe("dhash").key().startswith("dhash8-draft256-g32c8-imagehash")
    assert HashRecipe(draft_size=64).key().startswith("phash8-draft64-luma-gap3-g32c8-dct")
    assert HashRecipe("dhash", 16).to_dict()["key"] == HashRecipe("dhash", 16).key()
    with pytest.raises(HashingError):
        HashRecipe("sha1")
    with pytest.raises(HashingError):
        HashRecipe("whash", 12)
    with pytest.raises(HashingError, match="method"):
        HashRecipe(method="turbo")


def test_unreadable_bytes_raise_image_error():
    with pytest.raises(images.ImageError) as info:
        hash_image_bytes("gs://b/x.jpg", "x", b"not an image at all", HashRecipe())
    assert info.value.reason == "not_an_image" and info.value.uri == "gs://b/x.jpg"
    with pytest.raises(images.ImageError):
        hash_image_bytes(
            "big.png",
            "x",
            _encode(Image.new("RGB", (300, 300)), "PNG"),
            HashRecipe(),
            max_pixels=1000,
        )


def _made_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return _encode(Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC))


def test_hash_cache_hits_and_recipe_isolation(tmp_path):
    data = _made_jpeg(1)
    recipe = HashRecipe()
    cache = HashCache()
    first = hash_image_bytes("a.jpg", "l", data, recipe, cache=cache, mtime=3.0)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    assert first.descriptor == b""
    # Describing later completes the entry (and hits it: no second hash decode).
    first = hash_image_bytes("a.jpg", "l", data, recipe, cache=cache, mtime=3.0, describe=True)
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    assert len(first.descriptor) == DESCRIPTOR_BYTES
    assert cache.get(first.sha256, recipe).descriptor == first.descriptor
    uri = str(tmp_path / "cache" / "hashes.npz")
    cache.save(uri)
    loaded = HashCache.load(uri)
    again = hash_image_bytes("b.jpg", "other", data, recipe, cache=loaded, mtime=3.0)
    assert loaded.hits == 1 and loaded.misses == 0
    assert (again.hash, again.descriptor, again.width, again.height) == (
        first.hash,
        first.descriptor,
        first.width,
        first.height,
    )
    assert again.uri == "b.jpg" and again.label == "other"
    # Another recipe never reads this entry.
    other = hash_image_bytes("b.jpg", "l", data, HashRecipe(method="imagehash"), cache=loaded)
    assert loaded.misses == 1 and len(loaded) == 2 and other.sha256 == first.sha256
    assert HashCache.load(str(tmp_path / "missing.npz")).get(first.sha256, recipe) is None
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(HashCacheError, match="delete it"):
        HashCache.load(str(tmp_path / "bad.npz"))


def test_hash_cache_merge_keeps_descriptors():
    """A run that did not describe an image never erases the descriptor an earlier run made."""
    old, new = HashCache(), HashCache()
    old.put("a" * 64, "r", 1, 2, 3, b"desc")
    new.put("a" * 64, "r", 1, 2, 3, b"")
    new.put("b" * 64, "r", 4, 5, 6, b"")
    assert old.update(new) == 1  # only the new entry
    assert old.get("a" * 64, "r").descriptor == b"desc" and len(old) == 2
    newer = HashCache()
    newer.put("b" * 64, "r", 4, 5, 6, b"later")
    assert old.update(newer) == 1 and old.get("b" * 64, "r").descriptor == b"later"
    assert old.update(newer) == 0


def test_hash_cache_keeps_pair_tests_by_direction_and_version():
    cache = HashCache()
    cache.put_pair("a" * 64, "b" * 64, "orb-v1", (300, 120, 100, 80, 0.5))
    cache.put_pair("a" * 64, "b" * 64, "orb-v2", (250, 10, 5, 0, 0.01))
    back = HashCache.from_bytes(cache.to_bytes())
    assert back.pair_count == 2 and len(back) == 0
    assert back.get_pair("a" * 64, "b" * 64, "orb-v1") == (300, 120, 100, 80, 0.5)
    assert back.get_pair("a" * 64, "b" * 64, "orb-v2") == (250, 10, 5, 0, 0.01)
    # The test is directional (coverage is of the first image): no answer the other way.
    assert back.get_pair("b" * 64, "a" * 64, "orb-v1") is None
    more = HashCache()
    more.put_pair("a" * 64, "b" * 64, "orb-v1", (300, 120, 100, 80, 0.5))  # the same: no change
    more.put_pair("c" * 64, "d" * 64, "orb-v1", (1, 2, 3, 4, 0.0))
    assert back.update(more) == 1 and back.pair_count == 3


def _resaved(cache: HashCache, **changes) -> bytes:
    """``cache``'s file with some arrays replaced (None: removed)."""
    with np.load(io.BytesIO(cache.to_bytes()), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_hash_cache_reads_format_2_and_refuses_a_malformed_pair_table():
    cache = HashCache()
    cache.put("a" * 64, "r", 1, 2, 3, b"d")
    cache.put_pair("a" * 64, "b" * 64, "v", (300, 20, 10, 5, 0.5))
    pair_keys = ["pair_a", "pair_b", "pair_versions", "pair_version_index"]
    pair_keys += ["pair_counts", "pair_coverage"]
    old = _resaved(cache, version=np.array([2]), **dict.fromkeys(pair_keys))
    back = HashCache.from_bytes(old)
    assert back.get("a" * 64, "r") == (1, 2, 3, b"d") and back.pair_count == 0
    for bad in (
        {"pair_counts": np.array([300, 20, 10, 5])},  # 1-D
        {"pair_counts": np.zeros((1, 3), np.int64)},  # a column short
        {"pair_version_index": np.array([-1], np.int32)},
        {"pair_version_index": np.array([1], np.int32)},  # past the table
        {"pair_a": np.array([7])},  # not sha256 bytes
        {"pair_coverage": np.array([0.5, 0.5])},  # another length
        {"pair_b": None},
    ):
        with pytest.raises(HashCacheError, match="delete it"):
            HashCache.from_bytes(_resaved(cache, **bad))
    with pytest.raises(HashCacheError, match="delete it"):
        HashCache.from_bytes(cache.to_bytes()[:200])  # truncated


def test_hash_cache_long_hashes_round_trip():
    cache = HashCache()
    long_hash = (1 << 255) | 77
    cache.put("f" * 64, HashRecipe("phash", 16), 10, 20, long_hash, b"\x01\x02")
    cache.put("e" * 64, "some-other-recipe", 1, 2, 0, b"")
    back = HashCache.from_bytes(cache.to_bytes())
    assert back.get("f" * 64, HashRecipe("phash", 16)) == (10, 20, long_hash, b"\x01\x02")
    assert back.get("e" * 64, "some-other-recipe") == (1, 2, 0, b"")
    assert list(back.items()) == list(cache.items())


def test_hash_cache_on_gcs(gcs_bucket):
    cache = HashCache()
    record = hash_image_bytes("a.jpg", "l", _made_jpeg(2), HashRecipe(), cache=cache, describe=True)
    uri = f"{gcs_bucket}/dedup/hash_cache.npz"
    cache.save(uri)
    loaded = HashCache.load(uri)
    assert loaded.get(record.sha256, HashRecipe()) == (
        record.width,
        record.height,
        record.hash,
        record.descriptor,
    )


def test_hash_cache_reads_the_previous_format(tmp_path):
    """Format 1 (unicode arrays, compressed) as the first release wrote it."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        version=np.array([1], dtype=np.int64),
        sha256=np.array(["a" * 64, "b" * 64], dtype=np.str_),
        recipe=np.array(["r1", "r2"], dtype=np.str_),
        width=np.array([3, 5], dtype=np.int64),
        height=np.array([4, 6], dtype=np.int64),
        hash=np.array(["00000000000000ff", "1"], dtype=np.str_),
        descriptor=np.frombuffer(b"xyz", dtype=np.uint8),
        offsets=np.array([0, 2, 3], dtype=np.int64),
    )
    (tmp_path / "v1.npz").write_bytes(buf.getvalue())
    cache = HashCache.load(str(tmp_path / "v1.npz"))
    assert cache.get("a" * 64, "r1") == (3, 4, 255, b"xy")
    assert cache.get("b" * 64, "r2") == (5, 6, 1, b"z")
    # Saved again in the current format, the same entries come back.
    cache.save(str(tmp_path / "v2.npz"))
    assert list(HashCache.load(str(tmp_path / "v2.npz")).items()) == list(cache.items())
