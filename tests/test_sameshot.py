"""The same-shot test of candidate pairs: keypoints + RANSAC homography, and the combination rule."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from kaedama.dedup import sameshot
from kaedama.dedup.decide import (
    MIN_COVERAGE,
    MIN_KEYPOINTS,
    DedupConfig,
    decide,
    same_shot,
)
from kaedama.dedup.hashing import (
    HashRecipe,
    describe_bytes,
    descriptor_similarity,
    hash_image_bytes,
)
from kaedama.dedup.sameshot import Geometry

pytest.importorskip("cv2", reason="the keypoint test needs opencv-python-headless (kaedama[clean])")


def scene(seed: int, size=(320, 240), paint: int | None = None) -> Image.Image:
    """A textured 'photo': a shaded backdrop with random shapes, lines and text.

    ``paint`` repaints the same layout: every shape where ``seed`` puts it, in the
    colours of ``paint`` (the same object in another colour, on the same rig).
    """
    rnd = np.random.default_rng(seed)
    colours = np.random.default_rng(seed if paint is None else 1000 + paint)
    w, h = size
    ramp = np.linspace(60, 200, w, dtype=np.float32)[None, :, None]
    base = np.broadcast_to(ramp, (h, w, 3)) + rnd.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = int(rnd.integers(0, w - 20)), int(rnd.integers(0, h - 20))
        x1, y1 = x0 + int(rnd.integers(8, 70)), y0 + int(rnd.integers(8, 60))
        rnd.integers(0, 256, 3)  # keep the layout's random stream whatever the paint
        colour = tuple(int(c) for c in colours.integers(0, 256, 3))
        if rnd.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0))
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        draw.line((x0, y1, x1, y0), fill=tuple(255 - c for c in colour), width=2)
    for k in range(6):
        draw.text((int(rnd.integers(0, w - 60)), int(rnd.integers(0, h - 12))), f"K{seed}-{k}")
    return img.filter(ImageFilter.SMOOTH)


def jpeg(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def planted_copies(img: Image.Image) -> dict[str, bytes]:
    w, h = img.size
    return {
        "resize50": jpeg(img.resize((w // 2, h // 2), Image.Resampling.LANCZOS)),
        "jpeg25": jpeg(img, 25),
        "crop8": jpeg(img.crop((13, 10, w - 13, h - 10))),
        "bright130": jpeg(ImageEnhance.Brightness(img).enhance(1.3)),
        "rotate4": jpeg(img.rotate(4, resample=Image.Resampling.BILINEAR)),
    }


@pytest.fixture(scope="module")
def original() -> Image.Image:
    return scene(1)


def test_planted_copies_are_the_same_shot(original):
    data = jpeg(original)
    config = DedupConfig()
    for name, copy in planted_copies(original).items():
        geometry = sameshot.verify_bytes(data, copy)
        sim = descriptor_similarity(describe_bytes(data), describe_bytes(copy))
        assert geometry.keypoints >= MIN_KEYPOINTS, name
        assert geometry.exact_ratio >= config.keypoint_threshold, (name, geometry)
        assert same_shot(sim, geometry, config)[0], (name, sim, geometry)
        assert same_shot(sim, geometry, DedupConfig(same_shot="keypoints"))[0], name


def test_different_pictures_are_rejected(original):
    data = jpeg(original)
    for seed in (2, 3, 4):
        other = jpeg(scene(seed))
        geometry = sameshot.verify_bytes(data, other)
        assert geometry.exact_ratio < DedupConfig().keypoint_threshold, (seed, geometry)
        sim = descriptor_similarity(describe_bytes(data), describe_bytes(other))
        assert not same_shot(sim, geometry, DedupConfig())[0]


def test_the_same_layout_repainted_is_rejected_by_the_patches(original):
    """One layout in other colours (one model of motorbike in another paint, same rig).

    A homography explains the shapes' outlines, but the patches are not the same exposure.
    """
    geometry = sameshot.verify_bytes(jpeg(original), jpeg(scene(1, paint=2)))
    assert geometry.exact_ratio < DedupConfig().keypoint_threshold, geometry


def test_flat_images_have_no_keypoints():
    flat = jpeg(Image.new("RGB", (200, 150), (240, 240, 240)))
    geometry = sameshot.verify_bytes(flat, flat)
    assert geometry.keypoints < MIN_KEYPOINTS
    # combined: too little texture to judge, so the descriptor decides (two flat images match)
    sim = descriptor_similarity(describe_bytes(flat), describe_bytes(flat))
    assert same_shot(sim, geometry, DedupConfig()) == (True, None)
    assert same_shot(sim, geometry, DedupConfig(same_shot="keypoints"))[0] is False


@pytest.mark.parametrize(
    ("method", "similarity", "geometry", "expected"),
    [
        # descriptor: the thumbnail correlation alone, no keypoint score
        ("descriptor", 0.85, None, (True, None)),
        ("descriptor", 0.79, Geometry(400, 300, 300, 300), (False, None)),
        # keypoints: the exact share alone; an unverified pair stays unconfirmed
        ("keypoints", 0.10, Geometry(400, 100, 90, 40, 0.5), (True, 0.1)),
        ("keypoints", 0.99, Geometry(400, 100, 90, 8, 0.5), (False, 0.02)),
        ("keypoints", 0.99, None, (False, None)),
        # combined: keypoints decide where there is texture, whatever the thumbnails say...
        ("combined", 0.95, Geometry(400, 100, 90, 8, 0.5), (False, 0.02)),
        ("combined", 0.30, Geometry(400, 100, 90, 40, 0.5), (True, 0.1)),
        # ... over more than a corner of the picture (a shared logo matches exactly)
        ("combined", 0.95, Geometry(400, 100, 90, 40, MIN_COVERAGE / 2), (False, 0.1)),
        # ... and the descriptor decides without texture or without a test
        ("combined", 0.85, Geometry(MIN_KEYPOINTS - 1), (True, None)),
        ("combined", 0.75, Geometry(MIN_KEYPOINTS - 1), (False, None)),
        ("combined", 0.85, None, (True, None)),
    ],
)
def test_combination_rule(method, similarity, geometry, expected):
    assert same_shot(similarity, geometry, DedupConfig(same_shot=method)) == expected


def test_decide_uses_the_geometry_and_reports_the_score(original):
    """A same-shot pair clusters, a look-alike with a passing descriptor does not."""
    recipe = HashRecipe()
    a, b = jpeg(original), planted_copies(original)["resize50"]
    c = jpeg(scene(5))
    records = [
        hash_image_bytes(uri, "x", data, recipe, describe=True)
        for uri, data in (("a.jpg", a), ("b.jpg", b), ("c.jpg", c))
    ]
    pairs = [("a.jpg", "b.jpg", 0), ("a.jpg", "c.jpg", 0)]
    geometry = {
        ("a.jpg", "b.jpg"): sameshot.verify_bytes(a, b),
        # a look-alike: pretend its descriptor passes, the keypoints say otherwise
        ("a.jpg", "c.jpg"): sameshot.verify_bytes(a, c),
    }
    config = DedupConfig(threshold=63, confirm_threshold=-1.0)
    result = decide(records, [], pairs, config, geometry=geometry)
    by_pair = {(p[0], p[1]): p for p in result.candidate_pairs}
    assert by_pair[("a.jpg", "b.jpg")][4] is True
    assert by_pair[("a.jpg", "b.jpg")][5] == round(geometry[("a.jpg", "b.jpg")].exact_ratio, 6)
    assert by_pair[("a.jpg", "c.jpg")][4] is False
    assert [c["kept"] for c in result.clusters] == [["a.jpg"]]
    # The descriptor alone (at this threshold) would have merged all three.
    loose = decide(
        records,
        [],
        pairs,
        DedupConfig(threshold=63, confirm_threshold=-1.0, same_shot="descriptor"),
    )
    assert len(loose.clusters[0]["members"]) == 3
    assert all(p[5] is None for p in loose.candidate_pairs)


def test_missing_opencv_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    sameshot._cv2.cache_clear()
    try:
        with pytest.raises(sameshot.OpenCVMissingError, match=r"kaedama\[clean\]"):
            sameshot.require()
    finally:
        monkeypatch.undo()
        sameshot._cv2.cache_clear()


@pytest.mark.shared
def test_caltech_lookalikes_rejected_and_copies_kept(shared_datasets):
    """Pairs of the labelled bench set (bench/sameshot_pairs.jsonl) that the descriptor gets wrong."""
    root = shared_datasets / "caltech101"
    config = DedupConfig()

    def judge(a: str, b: str) -> tuple[float, bool]:
        da, db = (root / a).read_bytes(), (root / b).read_bytes()
        sim = descriptor_similarity(describe_bytes(da), describe_bytes(db))
        return sim, same_shot(sim, sameshot.verify_bytes(da, db), config)[0]

    # different motorbikes on one studio rig: the descriptor passes them, the patches do not
    for a, b in [
        ("Motorbikes/image_0032.jpg", "Motorbikes/image_0034.jpg"),
        ("Motorbikes/image_0717.jpg", "Motorbikes/image_0718.jpg"),
        ("Motorbikes/image_0719.jpg", "Motorbikes/image_0720.jpg"),
    ]:
        sim, confirmed = judge(a, b)
        assert sim >= config.confirm_threshold and not confirmed, (a, b, sim)
    # one exposure: a crop (Faces_easy) and a rescaled copy
    for a, b in [
        ("Faces/image_0114.jpg", "Faces_easy/image_0114.jpg"),
        ("Motorbikes/image_0018.jpg", "Motorbikes/image_0147.jpg"),
        ("minaret/image_0025.jpg", "minaret/image_0051.jpg"),
    ]:
        assert judge(a, b)[1], (a, b)


def test_both_engines_paths_give_the_same_features_and_descriptor(tmp_path, original):
    """In-process: one decode for descriptor and features; Beam: features per pair. Equal."""
    from kaedama.dedup import job

    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(original))
    data = path.read_bytes()
    uri, sha, desc, feats = job.describe_with_features(str(path), DedupConfig(), HashRecipe())
    alone = sameshot.features(data)
    assert desc == describe_bytes(data) and len(sha) == 64
    assert np.array_equal(feats.points, alone.points)
    assert np.array_equal(feats.descriptors, alone.descriptors)
    verified = job.verify_pair((str(path), str(path), 0), DedupConfig())
    assert verified == job.match_pair(str(path), str(path), sha, sha, feats, feats)
    assert job.geometry_of([verified, None]) == {(str(path), str(path)): Geometry(*verified[4:])}
    missing = job.describe_with_features(str(tmp_path / "gone.jpg"), DedupConfig(), HashRecipe())
    assert missing[2:] == (b"", None)
    assert job.verify_pair((str(path), str(tmp_path / "gone.jpg"), 0), DedupConfig()) is None


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (1, 1)),
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (3, 2000, 3), dtype=np.uint8)),
        Image.new("CMYK", (64, 64), (0, 50, 100, 0)),
        Image.new("P", (64, 64)),
    ],
    ids=["1x1", "3x2000-strip", "flat-cmyk", "flat-palette"],
)
def test_degenerate_images_have_no_keypoints_and_fall_back(image):
    data = jpeg(image.convert("RGB")) if image.mode == "CMYK" else _png(image)
    geometry = sameshot.verify_bytes(data, data)
    assert geometry == Geometry(0)
    assert same_shot(1.0, geometry, DedupConfig()) == (True, None)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_pair_tests_are_cached_by_content_for_both_engines(tmp_path, original):
    """A re-run takes each pair's keypoint test from the hash cache (keyed by the two
    files' sha256s and the test's version), in process and in the Beam job alike: a
    tampered cached test changes the decision, a fresh cache restores it."""
    from beam import dedup as beam_dedup
    from kaedama.dedup import job
    from kaedama.dedup.hashcache import HashCache
    from kaedama.manifest import read_manifest

    root = tmp_path / "in"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(jpeg(original))
    (root / "cat" / "b.jpg").write_bytes(planted_copies(original)["resize50"])
    cache = tmp_path / "hashes.npz"

    def dropped(run, out: str, cache_uri: str) -> list[str]:
        run(job.JobPaths(str(root), str(tmp_path / out), cache=cache_uri), DedupConfig())
        rows = read_manifest(str(tmp_path / out / "manifest.jsonl")).rows
        return sorted(r.reason for r in rows if r.status == "dropped")

    in_process = lambda paths, config: job.run_in_process(paths, config, workers=1)  # noqa: E731
    assert dropped(in_process, "first", str(cache)) == ["near_duplicate"]
    stored = HashCache.load(str(cache))
    assert stored.pair_count == 1
    ((sha_a, sha_b, version),) = stored._pairs
    assert version == sameshot.cache_key() and version.startswith(sameshot.VERSION)
    keypoints = stored.get_pair(sha_a, sha_b, version)[0]
    assert keypoints >= MIN_KEYPOINTS
    # Tamper: the same pair, now with no exact inliers. Both engines must believe it.
    stored.put_pair(sha_a, sha_b, version, (keypoints, 0, 0, 0, 0.0))
    stored.save(str(cache))
    assert dropped(in_process, "second", str(cache)) == []
    assert dropped(beam_dedup.run_job, "beam", str(cache)) == []
    # A fresh cache decides again, from the pixels.
    assert dropped(beam_dedup.run_job, "fresh", str(tmp_path / "fresh.npz")) == ["near_duplicate"]
    assert HashCache.load(str(tmp_path / "fresh.npz")).pair_count == 1


def test_a_file_replaced_under_its_name_is_tested_again(tmp_path, original):
    """The cache answers by content: new bytes under an old name are matched afresh (the
    Beam job's verify_pair, in one process), and a test is cached only under the
    contents the run fingerprinted."""
    from kaedama.dedup import job
    from kaedama.dedup.hashcache import HashCache
    from kaedama.dedup.hashing import ImageRecord

    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(jpeg(original))
    b.write_bytes(planted_copies(original)["resize50"])
    first = job.verify_pair((str(a), str(b), 0), DedupConfig())
    sha_a, sha_b = first[2], first[3]

    def records(sha_of_b: str) -> list[ImageRecord]:
        return [
            ImageRecord(str(a), "x", sha_a, 1, 1, 1, 0),
            ImageRecord(str(b), "x", sha_of_b, 1, 1, 1, 0),
        ]

    cache = job.cache_of(records(sha_b), [], "r", [first])
    assert cache.get_pair(sha_a, sha_b, sameshot.cache_key()) == first[4:]
    # b changed between fingerprinting and the test: the test is not kept.
    assert job.cache_of(records("0" * 64), [], "r", [first]).pair_count == 0
    cache = HashCache()
    cache.put_pair(sha_a, sha_b, sameshot.cache_key(), (400, 0, 0, 0, 0.0))
    assert job.verify_pair((str(a), str(b), 0), DedupConfig(), cache)[4:] == (400, 0, 0, 0, 0.0)
    b.write_bytes(jpeg(scene(7)))  # another picture under the same name
    again = job.verify_pair((str(a), str(b), 0), DedupConfig(), cache)
    assert again[3] != sha_b and again[4:] != (400, 0, 0, 0, 0.0)
    assert not same_shot(0.0, Geometry(*again[4:]), DedupConfig())[0]
