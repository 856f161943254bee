"""Dedup decisions on hand-built records, every policy, and one run on real photos."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random

import numpy as np
import pytest
from PIL import Image

from kaedama import images
from kaedama.config import ConfigError, build_config
from kaedama.dedup.decide import (
    DedupConfig,
    DedupError,
    Rejected,
    decide,
    manifest_header,
    run_local,
)
from kaedama.dedup.hashing import DESCRIPTOR_BYTES, HashRecipe, ImageRecord, hash_image_bytes
from tests.hashes import planted_hashes

DESC_LEN = DESCRIPTOR_BYTES


def _desc(seed: int, noise: int = 0) -> bytes:
    """A thumbnail-like descriptor; the same seed with small noise stays correlated."""
    base = np.random.default_rng(seed).integers(0, 256, DESC_LEN)
    jitter = np.random.default_rng(seed * 7919 + noise).integers(-noise, noise + 1, DESC_LEN)
    return np.clip(base + jitter, 0, 255).astype(np.uint8).tobytes()


def rec(uri, label, *, sha=None, h=0, scene=0, noise=0, w=100, hgt=100, size=1000, mtime=0.0):
    return ImageRecord(
        uri=uri,
        label=label,
        sha256=sha or hashlib.sha256(uri.encode()).hexdigest(),
        bytes=size,
        width=w,
        height=hgt,
        hash=h,
        descriptor=_desc(scene, noise),
        mtime=mtime,
    )


def by_uri(result):
    return {row.uri: row for row in result.rows}


def check_counts(result, n_inputs):
    s = result.summary
    assert s["input"] == n_inputs == len(result.rows)
    assert s["kept"] + s["dropped"] + s["rejected"] == n_inputs
    for label, entry in s["per_label"].items():
        rows = [r for r in result.rows if r.label == label]
        assert entry["before"] == len(rows)
        assert entry["after"] == sum(r.status == "kept" for r in rows)
        assert entry["before"] == entry["after"] + entry["dropped"] + entry["rejected"]


SHA_A = "a" * 64
SHA_B = "b" * 64


def test_exact_duplicates_keep_policies():
    records = [
        rec("d/cats/3.jpg", "cats", sha=SHA_A, mtime=5.0),
        rec("d/cats/1.jpg", "cats", sha=SHA_A, mtime=9.0),
        rec("d/cats/2.jpg", "cats", sha=SHA_A, mtime=1.0),
        rec("d/cats/9.jpg", "cats", sha=SHA_B, h=(1 << 64) - 1, scene=3),
    ]
    first = by_uri(run_local(records, [], DedupConfig()))
    assert first["d/cats/1.jpg"].status == "kept"
    for uri in ("d/cats/2.jpg", "d/cats/3.jpg"):
        assert first[uri].status == "dropped"
        assert first[uri].reason == "exact_duplicate"
        assert first[uri].duplicate_of == "d/cats/1.jpg"
    assert first["d/cats/9.jpg"].status == "kept" and first["d/cats/9.jpg"].cluster == ""
    assert first["d/cats/1.jpg"].cluster == "c" + "a" * 12
    oldest = by_uri(run_local(records, [], DedupConfig(exact_keep="oldest")))
    assert oldest["d/cats/2.jpg"].status == "kept"
    assert oldest["d/cats/1.jpg"].duplicate_of == "d/cats/2.jpg"
    # Identical bytes have identical size, so "largest" falls back to the first URI.
    largest = by_uri(run_local(records, [], DedupConfig(exact_keep="largest")))
    assert largest["d/cats/1.jpg"].status == "kept"


def test_near_duplicates_keep_largest_or_first():
    records = [
        rec("x/dogs/a.jpg", "dogs", h=0b0000, scene=1, w=100, hgt=100),
        rec("x/dogs/b.jpg", "dogs", h=0b0011, scene=1, noise=3, w=400, hgt=300),
        rec("x/dogs/c.jpg", "dogs", h=0b1111, scene=1, noise=5, w=200, hgt=200),
    ]
    result = run_local(records, [], DedupConfig())
    rows = by_uri(result)
    assert rows["x/dogs/b.jpg"].status == "kept"
    assert {rows[u].reason for u in ("x/dogs/a.jpg", "x/dogs/c.jpg")} == {"near_duplicate"}
    assert rows["x/dogs/a.jpg"].duplicate_of == "x/dogs/b.jpg"
    assert len({r.cluster for r in result.rows}) == 1
    (cluster,) = result.clusters
    assert cluster["decision"] == "keep_one" and cluster["kept"] == ["x/dogs/b.jpg"]
    assert len(cluster["pairs"]) == 3 and all(p["confirmed"] for p in cluster["pairs"])
    first = by_uri(run_local(records, [], DedupConfig(near_keep="first")))
    assert first["x/dogs/a.jpg"].status == "kept"
    assert first["x/dogs/b.jpg"].duplicate_of == "x/dogs/a.jpg"
    check_counts(result, 3)


def test_threshold_bounds_candidates():
    records = [
        rec("a", "l", h=0, scene=1),
        rec("b", "l", h=0b11111, scene=1, noise=2),  # 5 bits away
    ]
    assert run_local(records, [], DedupConfig()).summary["candidate_pairs"] == 0
    result = run_local(records, [], DedupConfig(threshold=5))
    assert result.summary["candidate_pairs"] == 1
    assert result.summary["dropped"] == 1


def test_unconfirmed_candidates_do_not_cluster():
    # Same phash, unrelated thumbnails: a look-alike, not the same shot.
    records = [
        rec("p/shoe/1.jpg", "shoe", h=42, scene=1),
        rec("p/shoe/2.jpg", "shoe", h=42, scene=2),
    ]
    result = run_local(records, [], DedupConfig())
    assert all(r.status == "kept" and r.cluster == "" for r in result.rows)
    assert result.clusters == []
    ((a, b, dist, sim, ok, _),) = result.candidate_pairs
    assert (a, b, dist, ok) == ("p/shoe/1.jpg", "p/shoe/2.jpg", 0, False)
    assert sim < DedupConfig().confirm_threshold
    assert result.summary["candidate_pairs"] == 1 and result.summary["confirmed_pairs"] == 0
    # Without confirmation the hash alone decides.
    unconfirmed = run_local(records, [], DedupConfig(confirm=False))
    assert unconfirmed.summary["dropped"] == 1
    assert unconfirmed.candidate_pairs[0][4] is True


def _conflict_records():
    # One cluster: two cats (near-duplicates of each other) and one dog.
    return [
        rec("s/cats/1.jpg", "cats", h=0, scene=4, w=50, hgt=50),
        rec("s/cats/2.jpg", "cats", h=1, scene=4, noise=2, w=80, hgt=80),
        rec("s/dogs/1.jpg", "dogs", h=3, scene=4, noise=3),
        rec("s/dogs/alone.jpg", "dogs", h=(1 << 64) - 1, scene=9),
    ]


def test_conflict_drop_all():
    result = run_local(_conflict_records(), [], DedupConfig())
    rows = by_uri(result)
    for uri in ("s/cats/1.jpg", "s/cats/2.jpg", "s/dogs/1.jpg"):
        assert rows[uri].status == "dropped" and rows[uri].reason == "label_conflict"
        assert rows[uri].duplicate_of == ""
    assert rows["s/dogs/alone.jpg"].status == "kept"
    (cluster,) = result.clusters
    assert cluster["conflict"] and cluster["labels"] == ["cats", "dogs"]
    assert cluster["decision"] == "drop_all" and cluster["kept"] == []
    assert result.summary["conflict_clusters"] == 1
    assert result.summary["by_reason"] == {"label_conflict": 3}
    check_counts(result, 4)


def test_conflict_majority():
    result = run_local(_conflict_records(), [], DedupConfig(conflict_policy="majority"))
    rows = by_uri(result)
    assert rows["s/dogs/1.jpg"].reason == "label_conflict"
    assert rows["s/cats/2.jpg"].status == "kept"  # the larger cat
    assert rows["s/cats/1.jpg"].reason == "near_duplicate"
    assert rows["s/cats/1.jpg"].duplicate_of == "s/cats/2.jpg"
    assert result.clusters[0]["decision"] == "majority"
    # A tie has no strict majority: everything in the cluster goes.
    tie = [r for r in _conflict_records() if r.uri != "s/cats/1.jpg"]
    tied = by_uri(run_local(tie, [], DedupConfig(conflict_policy="majority")))
    assert tied["s/cats/2.jpg"].reason == "label_conflict"
    assert tied["s/dogs/1.jpg"].reason == "label_conflict"


def test_conflict_review_keeps_labels_and_flags():
    result = run_local(_conflict_records(), [], DedupConfig(conflict_policy="review"))
    rows = by_uri(result)
    assert rows["s/cats/2.jpg"].status == "kept" and rows["s/dogs/1.jpg"].status == "kept"
    assert rows["s/cats/1.jpg"].reason == "near_duplicate"  # still one per label group
    for uri in ("s/cats/1.jpg", "s/cats/2.jpg", "s/dogs/1.jpg"):
        assert rows[uri].extra == {"review": "label_conflict"}
    assert rows["s/dogs/alone.jpg"].extra == {}
    assert result.summary["review_flagged"] == 3
    assert result.clusters[0]["decision"] == "review"


def test_same_bytes_under_two_labels_is_a_conflict():
    records = [
        rec("f/Faces/1.jpg", "Faces", sha=SHA_A, h=7, scene=1),
        rec("f/Faces_easy/1.jpg", "Faces_easy", sha=SHA_A, h=7, scene=1),
    ]
    # Even with no candidate pairs at all, identical bytes cluster.
    result = decide(records, [], [], DedupConfig())
    assert {r.reason for r in result.rows} == {"label_conflict"}
    assert result.clusters[0]["exact_groups"] == [["f/Faces/1.jpg", "f/Faces_easy/1.jpg"]]


def test_rejected_rows_and_counts():
    records = [rec("r/a/1.jpg", "a", sha=SHA_A), rec("r/a/2.jpg", "a", sha=SHA_A)]
    rejected = [
        Rejected("r/a/bad.jpg", "a", "truncated", "JPEG data ends early", 17),
        Rejected("r/b/x.txt", "b", "not_an_image", "not a recognised image", 3),
    ]
    result = run_local(records, rejected, DedupConfig())
    rows = by_uri(result)
    assert rows["r/a/bad.jpg"].status == "rejected" and rows["r/a/bad.jpg"].bytes == 17
    assert rows["r/a/bad.jpg"].extra["message"] == "JPEG data ends early"
    s = result.summary
    assert (s["kept"], s["dropped"], s["rejected"]) == (1, 1, 2)
    assert s["by_reason"] == {"exact_duplicate": 1, "not_an_image": 1, "truncated": 1}
    assert s["per_label"]["b"] == {"before": 1, "after": 0, "dropped": 0, "rejected": 1}
    assert [r.uri for r in result.rows] == sorted(rows)
    check_counts(result, 4)


def test_order_independence():
    rng = random.Random(11)
    records = _conflict_records() + [
        rec(f"o/l{k % 3}/{k}.jpg", f"l{k % 3}", h=k // 4, scene=k // 4, noise=k % 4)
        for k in range(24)
    ]
    records.append(rec("o/l0/dup.jpg", "l0", sha=SHA_B, h=99, scene=5))
    records.append(rec("o/l1/dup.jpg", "l1", sha=SHA_B, h=99, scene=5))
    rejected = [Rejected("o/l2/bad.png", "l2", "corrupt", "broken")]
    config = DedupConfig(conflict_policy="majority", threshold=2)
    reference = run_local(records, rejected, config)
    pairs = [(a, b, d) for a, b, d, *_ in reference.candidate_pairs]
    for _ in range(4):
        shuffled = records[:]
        rng.shuffle(shuffled)
        swapped = [(b, a, d) if rng.random() < 0.5 else (a, b, d) for a, b, d in pairs]
        rng.shuffle(swapped)
        again = decide(shuffled, rejected[::-1], swapped + swapped[:3], config)
        assert again.rows == reference.rows
        assert again.clusters == reference.clusters
        assert again.summary == reference.summary
    assert reference.summary["clusters"] >= 6


def test_bad_inputs():
    a = rec("u/a/1.jpg", "a")
    with pytest.raises(DedupError, match="more than once"):
        decide([a, a], [], [], DedupConfig())
    with pytest.raises(DedupError, match="not among"):
        decide([a], [], [("u/a/1.jpg", "u/a/404.jpg", 0)], DedupConfig())


def test_config_validation_and_header():
    with pytest.raises(ConfigError):
        DedupConfig(threshold=64)
    with pytest.raises(ConfigError):
        DedupConfig(hash_algorithm="md5")
    with pytest.raises(ConfigError):
        DedupConfig(hash_algorithm="whash", hash_size=6)
    config = build_config(DedupConfig, overrides={"threshold": "6", "reduced_decode": "false"})
    assert config.threshold == 6 and config.recipe() == HashRecipe(reduced_decode=False)
    reference = build_config(
        DedupConfig, overrides={"hash_method": "imagehash", "draft_size": "256"}
    )
    assert reference.recipe() == HashRecipe(method="imagehash", draft_size=256)
    assert reference.recipe().key().startswith("phash8-draft256-g32c8-imagehash")
    with pytest.raises(ConfigError):
        DedupConfig(hash_method="turbo")
    header = manifest_header(config)
    assert header["hash_recipe"] == config.recipe().key()
    assert "full" in header["hash_recipe"] and header["dedup"]["threshold"] == 6
    assert dataclasses.asdict(config)["confirm_threshold"] == config.confirm_threshold


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.shared
def test_run_local_on_real_photos(shared_datasets):
    """Planted copies of real photos are found; distinct photos are left alone."""
    folder = shared_datasets / "hymenoptera" / "train" / "bees"
    paths = sorted(folder.glob("*.jpg"))[:8]
    recipe = DedupConfig().recipe()
    records, rejected = [], []
    for path in paths:
        data = path.read_bytes()
        records.append(hash_image_bytes(f"bees/{path.name}", "bees", data, recipe, describe=True))
    source = images.decode(paths[0].read_bytes())
    half = source.resize((source.width // 2, source.height // 2), Image.Resampling.LANCZOS)
    planted = {
        "bees/zz_half.jpg": ("bees", _jpeg(half)),
        "bees/zz_q25.jpg": ("bees", _jpeg(source, 25)),
        "ants/zz_copy.jpg": ("ants", paths[1].read_bytes()),
    }
    for uri, (label, data) in planted.items():
        records.append(hash_image_bytes(uri, label, data, recipe, describe=True))
    rejected.append(Rejected("bees/empty.jpg", "bees", "empty", "zero bytes"))
    result = run_local(records, rejected, DedupConfig())
    rows = by_uri(result)
    original = f"bees/{paths[0].name}"
    assert rows[original].status == "kept"  # the largest of the three
    for uri in ("bees/zz_half.jpg", "bees/zz_q25.jpg"):
        assert rows[uri].reason == "near_duplicate" and rows[uri].duplicate_of == original
    assert rows["ants/zz_copy.jpg"].reason == "label_conflict"
    assert rows[f"bees/{paths[1].name}"].reason == "label_conflict"
    assert sum(r.status == "kept" for r in result.rows) == len(paths) - 1
    check_counts(result, len(paths) + 4)


@pytest.mark.parametrize("threshold", [1, 4])
def test_shard_pairs_over_all_shards_equal_brute_force_once_each(threshold):
    """The Beam job's pair search, step by step over chunks of records, as its shuffles do."""
    from collections import defaultdict

    from kaedama.dedup.job import (
        block_shards,
        exact_groups,
        identical_pairs,
        sha_shards,
        shard_pairs,
    )
    from kaedama.dedup.neighbors import brute_force_pairs, hash_array

    hashes = planted_hashes(random.Random(threshold), 40, threshold + 1)
    # Two files with identical bytes form one group; the rest one file each.
    sha = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(len(hashes))]
    records = [ImageRecord("u0b", "l", sha[0], 1, 1, 1, hashes[0])]
    records += [ImageRecord(f"u{i:03d}", "l", sha[i], 1, 1, 1, h) for i, h in enumerate(hashes)]
    records[1] = ImageRecord("u0a", "l", sha[0], 1, 1, 1, hashes[0])
    chunks = [records[i::3] for i in range(3)]  # the identical pair lands in two chunks
    by_sha = defaultdict(list)
    for chunk in chunks:
        for key, part in sha_shards(chunk):
            by_sha[key].append(part)
    assert len(by_sha) > 1, "the records spread over several sha256 shards"
    group_lists = [exact_groups(parts) for parts in by_sha.values()]
    groups = sorted(g for gl in group_lists for g in gl)
    assert len(groups) == len(hashes) and ("u0a", "u0b") in [g[2] for g in groups]
    shards = defaultdict(list)
    for gl in group_lists:
        for key, part in block_shards(gl, threshold, 64):
            shards[key].append(part)
    assert len(shards) > threshold + 1, "the hashes spread over several shards per block"
    found = [
        p
        for (block, _), parts in shards.items()
        for p in shard_pairs(block, parts, threshold, 64, 5000)
    ]
    found += [p for g in groups for p in identical_pairs(g)]
    uris = [g[2] for g in groups]
    expected = [("u0a", "u0b", 0)]
    hashes_of = [int(g[1], 16) for g in groups]
    for i, j, d in brute_force_pairs(hash_array(hashes_of, 64), threshold).tolist():
        # One pair per pair of contents, between their first (smallest) URIs.
        a, b = uris[i][0], uris[j][0]
        expected.append((min(a, b), max(a, b), d))
    # Sorted lists, not sets: a pair reported from two buckets would show up twice.
    assert sorted(found) == sorted(expected)
    assert len(expected) > len(groups) // 2


def test_large_bucket_takes_the_vectorised_path_with_the_same_pairs():
    from kaedama.dedup.job import SMALL_BUCKET, bucket_pairs, exact_group
    from kaedama.dedup.neighbors import brute_force_pairs, hash_array

    rnd = random.Random(7)
    base = rnd.getrandbits(64)
    # Same top 13 bits (block 0 at t=4), the rest random but often close to each other.
    hashes = [
        base ^ sum(1 << b for b in rnd.sample(range(20), rnd.randint(0, 5))) for _ in range(80)
    ]
    groups = [
        exact_group(f"s{i:02d}", [(f"u{i:02d}", format(h, "x"))]) for i, h in enumerate(hashes)
    ]
    assert len(groups) > SMALL_BUCKET
    found = sorted(bucket_pairs(0, groups, 4, 64, 5000))
    expected = sorted(
        (f"u{i:02d}", f"u{j:02d}", d)
        for i, j, d in brute_force_pairs(hash_array(hashes, 64), 4).tolist()
    )
    assert found == expected and len(expected) > 10
