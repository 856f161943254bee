"""The dedup job end to end: local folders and gs:// (emulator), both entry points.

Entry points: ``kaedama dedup SRC --out DST`` (kaedama.cli.main) and the Beam module
(``beam.dedup.run`` in process, and ``python -m beam.dedup`` with worker processes).
Quality is measured against the fixture generator's ground truth.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from beam import dedup as job
from kaedama import cli, storage
from kaedama.dedup import job as dedup_job
from kaedama.dedup.decide import DedupConfig
from kaedama.fixtures import PHASH_RADIUS, GroundTruth
from kaedama.manifest import read_manifest
from tests.plugins.gcs import upload_many

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    "classes": ("猫", "犬 dog"),
    "per_class": 20,
    "exact_duplicates": 3,
    "near_duplicates": 4,
    "cross_label": 2,
    "corrupt": 3,
    "no_extension": 1,
}


def _rel(uri: str, root: str) -> str:
    return storage.relative_to(uri, root)


def _rows_by_rel(out: str, root: str) -> dict:
    return {_rel(r.uri, root): r for r in read_manifest(storage.join(out, "manifest.jsonl")).rows}


def _decisions(rows: dict) -> dict:
    """What was decided per file, independent of where the files live."""
    return {
        rel: (r.label, r.status, r.reason, r.phash, r.cluster, r.sha256) for rel, r in rows.items()
    }


def _check_against_truth(rows: dict, truth: GroundTruth) -> dict:
    """Assert the decisions agree with the ground truth; returns recall/precision numbers."""
    assert sorted(rows) == sorted(truth.labels), "every file must have exactly one row"
    for rel, reason in truth.corrupt.items():
        assert (rows[rel].status, rows[rel].reason) == ("rejected", reason), rel
    for rel in truth.no_extension:
        assert rows[rel].status != "rejected", f"{rel} is a JPEG without extension"
    for rel in truth.images:
        assert rows[rel].status != "rejected", rel
        assert rows[rel].label == truth.labels[rel]
    # Recall: every planted copy within the hash radius shares its original's cluster.
    planted = truth.duplicate_pairs(within=PHASH_RADIUS)
    found = sum(1 for pair in planted if _same_cluster(rows, *pair))
    recall = found / len(planted)
    # Precision: files clustered together show the same picture.
    clustered: dict[str, list[str]] = {}
    for rel, row in rows.items():
        if row.cluster:
            clustered.setdefault(row.cluster, []).append(rel)
    together = [pair for members in clustered.values() for pair in combinations(members, 2)]
    accidental = {frozenset(p[:2]) for p in truth.accidental_near_pairs}
    right = sum(
        1
        for a, b in together
        if truth.source_of(a) == truth.source_of(b) or frozenset((a, b)) in accidental
    )
    precision = right / len(together) if together else 1.0
    # Cross-label copies are label conflicts: dropped under the default drop_all policy.
    for original, copy in truth.cross_label_pairs:
        if frozenset((original, copy)) in planted:
            assert rows[original].reason == rows[copy].reason == "label_conflict"
    # Same-label exact copies: one of each identical pair stays at most.
    for original, copy in truth.exact_duplicates:
        statuses = {rows[original].status, rows[copy].status}
        assert statuses != {"kept"}, (original, copy)
    return {"recall": recall, "precision": precision, "planted": len(planted)}


def _same_cluster(rows: dict, a: str, b: str) -> bool:
    return bool(rows[a].cluster) and rows[a].cluster == rows[b].cluster


def _summary(out: str) -> dict:
    return json.loads(storage.read_text(storage.join(out, "summary.json")))


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> tuple[Path, GroundTruth]:
    from kaedama.fixtures import FixturesConfig, make_digits_folder

    root = tmp_path_factory.mktemp("e2e") / "src"
    return root, make_digits_folder(root, FixturesConfig(**SMALL), progress=False)


@pytest.fixture(scope="module")
def dirty_run(dirty_digits_folder, tmp_path_factory) -> tuple[Path, GroundTruth, Path, str]:
    """``kaedama dedup --runner DirectRunner`` (the Beam job) on the dirty folder: root,
    truth, output, stdout."""
    root, truth = dirty_digits_folder
    out = tmp_path_factory.mktemp("dirty-run") / "out"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        assert cli.main(["dedup", str(root), "--out", str(out), "--runner", "DirectRunner"]) == 0
    return root, truth, out, capture.getvalue()


def test_cli_on_the_dirty_folder_meets_the_ground_truth(dirty_run):
    root, truth, out, printed = dirty_run
    rows = _rows_by_rel(str(out), str(root))
    scores = _check_against_truth(rows, truth)
    assert scores["recall"] == 1.0, scores
    assert scores["precision"] == 1.0, scores
    summary = _summary(str(out))
    assert summary["kept"] + summary["dropped"] + summary["rejected"] == summary["input"]
    assert summary["input"] == len(truth.labels)
    assert printed.startswith(f"input {summary['input']} = kept {summary['kept']}")
    for name in ("clusters.jsonl", "candidates.jsonl", "rejected.jsonl", "report.html"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text("utf-8")
    assert html.count("data-cluster=") == summary["clusters"]


def test_in_process_engine_writes_exactly_what_the_beam_job_writes(dirty_run, tmp_path):
    root, _, beam_out, _ = dirty_run
    out = tmp_path / "in-process"
    # No runner and local paths: the in-process engine is the default.
    assert cli.main(["dedup", str(root), "--out", str(out), "--workers", "2"]) == 0
    for name in ("manifest.jsonl", "clusters.jsonl", "candidates.jsonl", "rejected.jsonl"):
        assert (out / name).read_bytes() == (beam_out / name).read_bytes(), name
    ours, theirs = _summary(str(out)), _summary(str(beam_out))
    cached = ours.pop("hash_cache"), theirs.pop("hash_cache")
    assert cached[0]["decoded"] == cached[1]["decoded"]
    assert cached[0]["pairs"] == cached[1]["pairs"] > 0
    assert ours == theirs
    assert (out / "report.html").read_bytes() == (beam_out / "report.html").read_bytes()
    # The same cache, pair tests included.
    from kaedama.dedup.hashcache import HashCache

    (mine,), (beams,) = (list((o / "cache").glob("*.npz")) for o in (out, beam_out))
    mine, beams = HashCache.load(str(mine)), HashCache.load(str(beams))
    assert list(mine.items()) == list(beams.items())
    assert mine._pairs == beams._pairs


def test_beam_entry_point_on_gcs_matches_the_local_run(small_digits, gcs_bucket, tmp_path):
    root, truth = small_digits
    objects = {
        f"src/{p.relative_to(root).as_posix()}": p.read_bytes()
        for p in root.rglob("*")
        if p.is_file()
    }
    upload_many(gcs_bucket, objects)
    src, out = f"{gcs_bucket}/src", f"{gcs_bucket}/out"
    summary = job.run(["--input", src, "--output", out])
    gcs_rows = _rows_by_rel(out, src)
    _check_against_truth(gcs_rows, truth)
    local_out = tmp_path / "local"
    assert cli.main(["dedup", str(root), "--out", str(local_out)]) == 0
    assert _decisions(gcs_rows) == _decisions(_rows_by_rel(str(local_out), str(root)))
    assert summary == _summary(out)
    html = storage.read_text(f"{out}/report.html")
    assert html.count("data-cluster=") == summary["clusters"] > 0
    assert storage.exists(dedup_job.default_cache_uri(out, DedupConfig()))


def test_cli_on_gcs_materializes_kept_images_and_leaves_sources_alone(small_digits, gcs_bucket):
    root, truth = small_digits
    objects = {
        p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()
    }
    upload_many(gcs_bucket, {f"data/{k}": v for k, v in objects.items()})
    src, out, kept = f"{gcs_bucket}/data", f"{gcs_bucket}/run", f"{gcs_bucket}/kept"
    before = {u: hashlib.sha256(storage.read_bytes(u)).hexdigest() for u in storage.list_files(src)}
    assert cli.main(["dedup", src, "--out", out, "--materialize", kept]) == 0
    after = {u: hashlib.sha256(storage.read_bytes(u)).hexdigest() for u in storage.list_files(src)}
    assert before == after
    rows = _rows_by_rel(out, src)
    kept_rel = sorted(rel for rel, r in rows.items() if r.status == "kept")
    assert sorted(_rel(u, kept) for u in storage.list_files(kept)) == kept_rel
    for rel in kept_rel[:5]:
        assert storage.read_bytes(f"{kept}/{rel}") == objects[rel]
    _check_against_truth(rows, truth)


def test_rerun_on_a_grown_folder_decodes_only_the_new_files(small_digits, tmp_path):
    root, _ = small_digits
    grown = tmp_path / "grown"
    shutil.copytree(root, grown)
    cache = str(tmp_path / "shared-cache.npz")
    out1, out2 = tmp_path / "run1", tmp_path / "run2"
    assert cli.main(["dedup", str(grown), "--out", str(out1), "--cache", cache]) == 0
    first = _summary(str(out1))["hash_cache"]
    assert first["hits"] == 0 and first["decoded"] == first["entries"] > 0
    # Two new pictures: distinct bytes never seen before.
    from tests.test_beam_dedup import _encode, _photo

    (grown / "猫" / "new-1.png").write_bytes(_encode(_photo(101)))
    (grown / "犬 dog" / "new-2.jpg").write_bytes(_encode(_photo(102), "JPEG"))
    assert cli.main(["dedup", str(grown), "--out", str(out2), "--cache", cache]) == 0
    second = _summary(str(out2))
    assert second["hash_cache"]["decoded"] == 2
    assert second["hash_cache"]["hits"] == first["entries"]
    assert second["input"] == _summary(str(out1))["input"] + 2
    rows = _rows_by_rel(str(out2), str(grown))
    assert rows["猫/new-1.png"].status == "kept"


def test_csv_list_with_unicode_uris_and_local_materialize(small_digits, tmp_path):
    root, truth = small_digits
    listing = tmp_path / "images.csv"
    rels = sorted(truth.labels)
    listing.write_text(
        "uri,label\n" + "".join(f"{root / rel},ラベル-{truth.labels[rel]}\n" for rel in rels),
        encoding="utf-8",
    )
    out, kept = tmp_path / "out", tmp_path / "kept"
    summary = job.run(["--input", str(listing), "--output", str(out), "--materialize", str(kept)])
    rows = {r.uri: r for r in read_manifest(str(out / "manifest.jsonl")).rows}
    assert sorted(rows) == sorted(str(root / rel) for rel in rels)
    assert {r.label for r in rows.values()} == {f"ラベル-{label}" for label in SMALL["classes"]}
    copies = sorted(p for p in kept.rglob("*") if p.is_file())
    assert len(copies) == summary["kept"] == sum(r.status == "kept" for r in rows.values())
    assert all(p.parent.name.startswith("ラベル-") for p in copies)


def test_output_inside_the_source_is_an_error(small_digits, capsys):
    root, _ = small_digits
    assert cli.main(["dedup", str(root), "--out", str(root / "out")]) == 1
    assert "overlaps the input folder" in capsys.readouterr().err
    assert not (root / "out").exists()


@pytest.mark.slow
def test_python_m_beam_dedup_with_worker_processes(small_digits, tmp_path):
    root, _ = small_digits
    out = tmp_path / "mp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "beam.dedup",
            "--input",
            str(root),
            "--output",
            str(out),
            "--direct_num_workers=2",
            "--direct_running_mode=multi_processing",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = tmp_path / "ref"
    job.run(["--input", str(root), "--output", str(reference)])
    assert _decisions(_rows_by_rel(str(out), str(root))) == _decisions(
        _rows_by_rel(str(reference), str(root))
    )


def test_the_jobs_review_page_renders_every_cluster_in_chromium(dirty_run, tmp_path):
    from tests.test_report import load_in_chromium

    _, _, out, _ = dirty_run
    clusters = [
        json.loads(line) for line in (out / "clusters.jsonl").read_text("utf-8").splitlines()
    ]
    facts = load_in_chromium(out / "report.html", tmp_path)
    assert facts["errors"] == []
    assert sorted(facts["clusters"]) == sorted(c["id"] for c in clusters)
    assert facts["conflicts"] == sum(c["conflict"] for c in clusters) > 0
    # Conflicts come first on the page.
    conflict_ids = {c["id"] for c in clusters if c["conflict"]}
    assert set(facts["clusters"][: len(conflict_ids)]) == conflict_ids
    assert facts["images"] == sum(len(c["members"]) for c in clusters)
    assert facts["brokenImages"] == 0


def test_in_process_engine_never_imports_apache_beam(small_digits, tmp_path):
    root, _ = small_digits
    out = tmp_path / "no-beam"
    code = (
        "import sys\n"
        "from kaedama import cli\n"
        f"rc = cli.main(['dedup', {str(root)!r}, '--out', {str(out)!r}])\n"
        "assert rc == 0, rc\n"
        "loaded = {m.split('.')[0] for m in sys.modules} & {'apache_beam', 'beam'}\n"
        "print('LOADED=' + ','.join(sorted(loaded)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "LOADED=", "the in-process engine loaded Beam"
    assert _summary(str(out))["input"] == len(list(p for p in root.rglob("*") if p.is_file()))
