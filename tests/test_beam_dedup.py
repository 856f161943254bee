"""Beam TestPipeline tests of each dedup transform (beam/dedup.py) on the DirectRunner."""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import replace
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam import dedup as job
from beam.common import DEFAULT_RUNNER, Gather
from kaedama import storage
from kaedama.dedup import job as dedup_job
from kaedama.dedup.decide import DedupConfig, Rejected, decide
from kaedama.dedup.hashcache import HashCache
from kaedama.dedup.hashing import DESCRIPTOR_BYTES, ImageRecord, describe_bytes, hash_image_bytes
from kaedama.dedup.neighbors import brute_force_pairs, hash_array
from kaedama.images import REASONS, ImageError
from kaedama.manifest import read_manifest
from tests.hashes import planted_hashes
from tests.test_images import png_header_only

# The DirectRunner's batch engine, without Beam 2.77's attempt to download Prism first.
RUNNER = DEFAULT_RUNNER


def _pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(runner=RUNNER)


def _photo(seed: int, size: int = 64) -> Image.Image:
    """A distinct smooth random picture (an 8x8 random grid, upscaled)."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _write(root: Path, rel: str, data: bytes) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def small_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A unicode-labelled folder with an exact copy, a near copy, a cross-label copy and bad files.

    Returns the root and ``{relative path: expected rejected reason}`` for the bad files.
    """
    root = tmp_path / "src"
    jpeg = _encode(_photo(1), "JPEG", quality=92)
    _write(root, "猫/a.jpg", jpeg)
    _write(root, "猫/a copy.jpg", jpeg)  # exact duplicate
    _write(root, "猫/a-small.png", _encode(_photo(1).resize((32, 32))))  # near duplicate
    _write(root, "猫/b", _encode(_photo(2), "JPEG", quality=90))  # JPEG without extension
    _write(root, "犬 dog/c.png", _encode(_photo(3)))
    _write(root, "犬 dog/a.jpg", jpeg)  # cross-label copy
    _write(root, "犬 dog/d.webp", _encode(_photo(4), "WEBP"))
    # One file for each of the decoder's reasons.
    bad = {
        "犬 dog/empty.jpg": "empty",
        "猫/notes.jpg": "not_an_image",
        "猫/cut.jpg": "truncated",
        "猫/damaged.png": "corrupt",
        "猫/lab.tif": "unsupported_mode",
        "犬 dog/huge.png": "too_large",
    }
    assert set(bad.values()) == set(REASONS)
    _write(root, "犬 dog/empty.jpg", b"")
    _write(root, "猫/notes.jpg", "これは画像ではない\n".encode())
    _write(root, "猫/cut.jpg", _encode(_photo(5, 128), "JPEG", quality=95)[:900])
    damaged = bytearray(_encode(_photo(6)))
    damaged[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    _write(root, "猫/damaged.png", bytes(damaged))
    _write(root, "猫/lab.tif", _encode(Image.new("LAB", (4, 4)), "TIFF"))
    _write(root, "犬 dog/huge.png", png_header_only(30000, 30000))  # 900 MP announced
    return root, bad


def test_list_inputs_folder_every_file_with_parent_label(small_folder):
    root, _ = small_folder
    expected = [(str(p), p.parent.name, "") for p in sorted(root.rglob("*")) if p.is_file()]
    with _pipeline() as p:
        chunks = p | job.ListInputs(str(root), chunk_size=5)
        assert_that(chunks | beam.FlatMap(lambda chunk: chunk), equal_to(expected), label="files")
        assert_that(chunks | beam.Map(len), equal_to([5, 5, 3]), label="chunks")
    assert len(expected) == 13


def test_list_inputs_in_branches_gives_the_same_chunks(small_folder):
    root, _ = small_folder
    with _pipeline() as p:
        one = p | "One" >> job.ListInputs(str(root), chunk_size=2)
        three = p | "Three" >> job.ListInputs(str(root), chunk_size=2, branches=3)
        assert_that(three | "Sizes" >> beam.Map(len), equal_to([2] * 6 + [1]), label="sizes")
        assert_that(
            three | "Files" >> beam.FlatMap(lambda chunk: chunk),
            equal_to([(str(p), p.parent.name, "") for p in sorted(root.rglob("*")) if p.is_file()]),
            label="files",
        )
        assert_that(
            one | "Tuples" >> beam.Map(tuple),
            equal_to(
                [tuple(c) for c in dedup_job.list_chunks(str(root), 2)],
            ),
            label="one",
        )


def test_list_inputs_csv_list_with_unicode_uris(tmp_path, small_folder):
    root, _ = small_folder
    listing = tmp_path / "list.csv"
    listing.write_text(
        f"uri,label\n{root / '猫/a.jpg'},ねこ\n犬 dog/c.png,いぬ\n", encoding="utf-8"
    )
    # Relative URIs resolve against the list's folder.
    (tmp_path / "犬 dog").mkdir()
    with _pipeline() as p:
        listed = p | job.ListInputs(str(listing)) | beam.FlatMap(lambda chunk: chunk)
        assert_that(
            listed,
            equal_to(
                [(str(root / "猫/a.jpg"), "ねこ", ""), (str(tmp_path / "犬 dog/c.png"), "いぬ", "")]
            ),
        )


def test_read_and_hash_tags_every_bad_file_with_the_decoder_reason(small_folder):
    root, bad = small_folder
    items = [(str(p), p.parent.name, "") for p in sorted(root.rglob("*")) if p.is_file()]
    missing = str(root / "猫" / "gone.jpg")
    items.append((missing, "猫", ""))
    config = DedupConfig()
    with _pipeline() as p:
        out = p | beam.Create([items[:6], items[6:]]) | job.ReadAndHash(config)
        assert_that(
            out["records"]
            | "Files" >> beam.FlatMap(lambda chunk: chunk)
            | "RecordUris" >> beam.Map(lambda t: dedup_job.record_from_tuple(t))
            | "UriLabel" >> beam.Map(lambda r: (r.uri, r.label)),
            equal_to(
                [i[:2] for i in items if i[0] not in {str(root / b) for b in bad} | {missing}]
            ),
            label="records",
        )
        assert_that(
            out[job.REJECTED] | beam.Map(lambda r: (r.uri, r.reason)),
            equal_to(
                [(str(root / rel), reason) for rel, reason in bad.items()]
                + [(missing, dedup_job.UNREADABLE)]
            ),
            label="rejected",
        )


def test_read_and_hash_uses_the_cache_instead_of_decoding(tmp_path, small_folder):
    root, _ = small_folder
    config = DedupConfig()
    recipe = config.recipe()
    path = root / "猫" / "a.jpg"
    real = hash_image_bytes(str(path), "猫", path.read_bytes(), recipe)
    # A cache entry with a made-up hash proves the record came from the cache.
    cache = HashCache()
    cache.put(real.sha256, recipe, 7, 9, 12345, real.descriptor)
    cache_uri = str(tmp_path / "cache.npz")
    cache.save(cache_uri)
    with _pipeline() as p:
        out = p | beam.Create([[(str(path), "猫", "")]]) | job.ReadAndHash(config, cache_uri)
        assert_that(
            out["records"]
            | beam.FlatMap(lambda chunk: chunk)
            | beam.Map(dedup_job.record_from_tuple)
            | beam.Map(lambda r: (r.hash, r.width, r.height, r.sha256)),
            equal_to([(12345, 7, 9, real.sha256)]),
        )


def test_exact_groups_and_identical_pairs():
    s1, s2 = hashlib.sha256(b"1").hexdigest(), hashlib.sha256(b"2").hexdigest()
    chunks = [
        [_rec("gs://b/x/1.jpg", s1, 5), _rec("gs://b/y/2.jpg", s1, 5)],
        [_rec("gs://b/x/0.jpg", s1, 5), _rec("gs://b/x/3.jpg", s2, 6)],
    ]
    with _pipeline() as p:
        groups = p | beam.Create(chunks) | job.ExactGroups() | beam.FlatMap(lambda gs: gs)
        assert_that(
            groups,
            equal_to(
                [
                    (s1, "5", ("gs://b/x/0.jpg", "gs://b/x/1.jpg", "gs://b/y/2.jpg")),
                    (s2, "6", ("gs://b/x/3.jpg",)),
                ]
            ),
            label="groups",
        )
        assert_that(
            groups | beam.FlatMap(dedup_job.identical_pairs),
            equal_to(
                [
                    ("gs://b/x/0.jpg", "gs://b/x/1.jpg", 0),
                    ("gs://b/x/0.jpg", "gs://b/y/2.jpg", 0),
                ]
            ),
            label="star",
        )


def _rec(uri: str, sha256: str, h: int) -> dedup_job.RecordTuple:
    """A record as ReadAndHash emits it (the fields ExactGroups reads, the rest filler)."""
    return dedup_job.record_to_tuple(ImageRecord(uri, "l", sha256, 1, 1, 1, h))


@pytest.mark.parametrize("threshold", [0, 3, 6])
def test_near_candidates_match_brute_force_and_report_each_pair_once(threshold):
    hashes = planted_hashes(random.Random(threshold), 60, threshold + 2)
    groups = [(f"sha{i:04d}", format(h, "x"), (f"u{i:04d}",)) for i, h in enumerate(hashes)]
    # One group stands for two identical files: its pairs name its first URI only (the
    # copies join it through identical_pairs), so copies never multiply the pairs.
    groups[0] = ("sha0000", format(hashes[0], "x"), ("u0000", "u0000b"))
    expected = []
    for i, j, d in brute_force_pairs(hash_array(hashes, 64), threshold).tolist():
        a, b = groups[i][2][0], groups[j][2][0]
        expected.append((min(a, b), max(a, b), d))
    assert expected, "the planted neighbours must give pairs"
    with _pipeline() as p:
        # Group lists as ExactGroups makes them, one per sha256 shard.
        lists = [groups[i::7] for i in range(7)]
        found = p | beam.Create(lists) | job.NearCandidates(threshold, 64, 5000)
        # equal_to compares multisets: a pair found in two buckets would fail here.
        assert_that(found, equal_to(expected))


def _records(root: Path, config: DedupConfig):
    recs, rejected = [], []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            recs.append(
                hash_image_bytes(str(path), path.parent.name, data, config.recipe(), describe=True)
            )
        except ImageError as exc:
            rejected.append(
                Rejected(str(path), path.parent.name, exc.reason, exc.message, len(data))
            )
    return recs, rejected


def test_describe_gives_each_pair_image_once_and_prefers_the_cache(tmp_path, small_folder):
    root, _ = small_folder
    config = DedupConfig()
    a, b, c = (str(root / rel) for rel in ("猫/a.jpg", "猫/a-small.png", "犬 dog/c.png"))
    cached = hash_image_bytes(b, "猫", Path(b).read_bytes(), config.recipe())
    cache = HashCache()
    cache.put(cached.sha256, config.recipe(), 1, 1, cached.hash, b"\x07" * DESCRIPTOR_BYTES)
    cache_uri = str(tmp_path / "cache.npz")
    cache.save(cache_uri)
    want = {
        a: describe_bytes(Path(a).read_bytes()),
        b: b"\x07" * DESCRIPTOR_BYTES,  # from the cache: not decoded again
        c: describe_bytes(Path(c).read_bytes()),
    }
    with _pipeline() as p:
        pairs = p | beam.Create([(a, b, 1), (a, c, 3), (b, c, 2)])
        described = pairs | job.Describe(config, cache_uri)
        digest = lambda d: hashlib.sha256(d).hexdigest()  # noqa: E731 (short failure output)
        assert_that(
            described | beam.Map(lambda t: (t[0], digest(t[2]))),
            equal_to([(uri, digest(d)) for uri, d in want.items()]),
        )


def test_gather_and_decide_equal_the_core_decision(small_folder):
    root, _ = small_folder
    config = DedupConfig(conflict_policy="majority")
    recs, rejected = _records(root, config)
    pairs = [
        (a.uri, b.uri, (a.hash ^ b.hash).bit_count()) for a in recs for b in recs if a.uri < b.uri
    ]
    pairs = [t for t in pairs if t[2] <= config.threshold]
    want = decide(recs, rejected, pairs, config)
    assert want.summary["confirmed_pairs"] > 0
    # The job's records carry no descriptor: they come separately, for pair images only.
    bare = [replace(r, descriptor=b"") for r in recs]
    descriptors = [(r.uri, r.sha256, r.descriptor) for r in recs]
    with _pipeline() as p:
        gathered = {
            "records": p
            | "R"
            >> beam.Create(
                [list(map(dedup_job.record_to_tuple, part)) for part in (bare[:3], bare[3:])]
            ),
            "rejected": p | "X" >> beam.Create(rejected),
            "pairs": p | "P" >> beam.Create(pairs),
            "descriptors": p | "D" >> beam.Create(descriptors),
            # Two listed chunks, counted apart from the rows.
            "listed": p | "L" >> beam.Create([3, len(recs) + len(rejected) - 3]),
        } | Gather()
        result = gathered | job.Decide(config)
        assert_that(
            result | beam.Map(lambda r: ([row.to_json() for row in r.rows], r.clusters)),
            equal_to([([row.to_json() for row in want.rows], want.clusters)]),
        )


def test_gather_gives_one_element_even_for_empty_inputs():
    with _pipeline() as p:
        gathered = {
            "a": p | "A" >> beam.Create([3, 1, 2]),
            "b": p | "B" >> beam.Create([]),
        } | Gather()
        assert_that(
            gathered | beam.Map(lambda g: {k: sorted(v) for k, v in g.items()}),
            equal_to([{"a": [1, 2, 3], "b": []}]),
        )


def test_whole_job_writes_every_output_and_accounts_for_every_file(tmp_path, small_folder):
    root, bad = small_folder
    out = tmp_path / "out"
    config = DedupConfig()
    paths = dedup_job.JobPaths(
        input=str(root), output=str(out), cache=dedup_job.default_cache_uri(str(out), config)
    )
    with _pipeline() as p:
        job.build_pipeline(p, paths, config)
    manifest = read_manifest(str(out / dedup_job.MANIFEST_NAME))
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert sorted(r.uri for r in manifest.rows) == files
    assert manifest.header["hash_recipe"] == config.recipe().key()
    by_uri = {r.uri: r for r in manifest.rows}
    for rel, reason in bad.items():
        assert by_uri[str(root / rel)].status == "rejected"
        assert by_uri[str(root / rel)].reason == reason
    assert by_uri[str(root / "猫/b")].status == "kept"  # a JPEG without extension is an image
    # The exact copy and the near copy go, one of the 猫 group stays... unless the
    # cross-label copy made the whole cluster a label conflict (drop_all).
    assert {by_uri[str(root / r)].reason for r in ("猫/a.jpg", "犬 dog/a.jpg")} == {
        "label_conflict"
    }
    summary = json.loads((out / dedup_job.SUMMARY_NAME).read_text("utf-8"))
    assert summary["kept"] + summary["dropped"] + summary["rejected"] == summary["input"] == 13
    assert summary["rejected"] == len(bad)
    assert summary["hash_cache"]["decoded"] > 0
    clusters = [
        json.loads(line) for line in (out / dedup_job.CLUSTERS_NAME).read_text("utf-8").splitlines()
    ]
    assert len(clusters) == summary["clusters"] >= 1
    rejected = [
        json.loads(line) for line in (out / dedup_job.REJECTED_NAME).read_text("utf-8").splitlines()
    ]
    assert {r["reason"] for r in rejected} == set(bad.values())
    html = (out / dedup_job.REPORT_NAME).read_text("utf-8")
    assert html.count("data-cluster=") == len(clusters)
    assert storage.exists(paths.cache)
    candidates = (out / dedup_job.CANDIDATES_NAME).read_text("utf-8").splitlines()
    assert len(candidates) == summary["candidate_pairs"]


def test_output_inside_the_input_is_refused(small_folder):
    root, _ = small_folder
    paths = dedup_job.JobPaths(input=str(root), output=str(root / "out"))
    with pytest.raises(dedup_job.DedupJobError, match="overlaps the input"):
        dedup_job.check_paths(paths)
    with pytest.raises(dedup_job.DedupJobError, match="overlaps the input"):
        dedup_job.check_paths(dedup_job.JobPaths(str(root), "/elsewhere", materialize=str(root)))


def test_in_process_engine_refuses_gcs_paths(tmp_path):
    paths = dedup_job.JobPaths(input="gs://bucket/data", output=str(tmp_path / "out"))
    with pytest.raises(dedup_job.DedupJobError, match="local paths only"):
        dedup_job.run_in_process(paths, DedupConfig())


def test_cli_hands_beam_options_through():
    from kaedama import cli
    from kaedama.commands.dedup import pipeline_args

    parser = cli.build_parser("dedup")
    args = parser.parse_args(
        [
            "dedup",
            "gs://b/data",
            "--out",
            "gs://b/out",
            "--runner",
            "DataflowRunner",
            "--beam-args",
            "--project p --region europe-west1 --setup_file ./pyproject.toml",
            "--beam-args=--temp_location=gs://b/tmp",
            "--threshold",
            "6",
        ]
    )
    assert pipeline_args(args) == [
        "--runner=DataflowRunner",
        "--project",
        "p",
        "--region",
        "europe-west1",
        "--setup_file",
        "./pyproject.toml",
        "--temp_location=gs://b/tmp",
    ]
    assert args.threshold == "6"


def test_job_options_take_both_spellings(tmp_path):
    """Beam spells options with underscores and silently keeps ones it cannot parse."""
    common = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    _, config, _ = job.parse_args(
        [*common, "--read_threads=1", "--hash_method=exact", "--no-reduced_decode"]
    )
    assert (config.read_threads, config.hash_method, config.reduced_decode) == (1, "exact", False)
    _, config, _ = job.parse_args([*common, "--read-threads", "2", "--conflict-policy", "review"])
    assert (config.read_threads, config.conflict_policy) == (2, "review")
    with pytest.raises(dedup_job.DedupJobError, match="read_threads"):
        job.parse_args([*common, "--read_threads=0"])


def test_branches_must_be_positive(tmp_path, small_folder):
    root, _ = small_folder
    paths = dedup_job.JobPaths(input=str(root), output=str(tmp_path / "out"))
    with pytest.raises(dedup_job.DedupJobError, match="--branches"):
        job.run_job(paths, DedupConfig(), ["--branches=0"])
