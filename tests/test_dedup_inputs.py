"""Hostile and messy inputs through the dedup job: nothing lost, nothing quadratic, no escape.

Each test names the defect it guards against (found in review): thousands of identical
files, stray and special files, URIs listed twice, file names holding line separators,
multi-GB files, labels that try to leave the --materialize prefix, list columns and
AutoML's CSV layout, Unicode spellings of one label, and a count check that can fail.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beam import dedup as beam_job
from kaedama import cli, manifest
from kaedama.commands.dedup import choose_engine
from kaedama.dedup import job
from kaedama.dedup.decide import DedupConfig, DedupError, decide
from kaedama.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _jpeg(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _photos(root: Path, labels=("cat", "dog"), per_label=4, seed=0) -> None:
    for k, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            (root / label / f"{i}.jpg").write_bytes(_jpeg(seed + 100 * k + i))


def _rows(out: Path) -> list[manifest.Row]:
    return read_manifest(str(out / "manifest.jsonl")).rows


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _dedup(*args: str) -> None:
    assert cli.main(["dedup", *args]) == 0


# --------------------------------------------------------------------------- O(n) copies


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["local", "beam"])
def test_five_thousand_copies_cost_linear_outputs(tmp_path, engine):
    src = tmp_path / "src"
    _photos(src, per_label=6)
    placeholder = _jpeg(999)
    n = 5000
    for i in range(n):
        (src / "cat" / f"p{i:04d}.jpg").write_bytes(placeholder)
    out = tmp_path / "out"
    runner = ["--runner", "DirectRunner"] if engine == "beam" else []
    _dedup(str(src), "--out", str(out), *runner)
    summary = _summary(out)
    assert summary["input"] == n + 12
    assert summary["by_reason"]["exact_duplicate"] == n - 1
    # n identical files: n - 1 star edges, not n(n-1)/2 = 12.5 M pairs.
    candidates = (out / "candidates.jsonl").read_text().splitlines()
    assert n - 1 <= len(candidates) < n + 50
    # The page shows the group once with a count: a few KB, not one figure per copy.
    page = (out / "report.html").read_text("utf-8")
    assert len(page.encode()) < 200_000
    assert "data-count='4999'" in page and f"{n - 1} identical files" in page
    assert page.count("<figure") == 2  # the kept file, and its 4,999 dropped copies
    assert page.count("<img src='data:image/jpeg;base64,") <= 4


# --------------------------------------------------------------------------- listing


def test_stray_special_and_repeated_entries_are_rejected_rows_not_errors(tmp_path):
    src = tmp_path / "src"
    _photos(src)
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / "README.txt").write_text("photos of pets")
    (src / "cat" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    os.mkfifo(src / "dog" / "pipe.jpg")
    out = tmp_path / "out"
    _dedup(str(src), "--out", str(out))
    by_name = {Path(r.uri).name: r for r in _rows(out)}
    assert (by_name[".DS_Store"].status, by_name[".DS_Store"].reason) == ("rejected", "no_label")
    assert by_name["README.txt"].reason == "no_label"
    assert (by_name["gone.jpg"].status, by_name["gone.jpg"].reason) == ("rejected", "not_a_file")
    assert by_name["pipe.jpg"].reason == "not_a_file"
    summary = _summary(out)
    # Counted independently: every entry on disk, as `find` sees it.
    on_disk = sum(len(files) for _, _, files in os.walk(src))
    assert summary["input"] == on_disk == 12
    assert summary["kept"] + summary["dropped"] + summary["rejected"] == on_disk
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in rejected) == ["no_label"] * 2 + ["not_a_file"] * 2


def test_a_uri_listed_twice_is_reported_once_as_duplicate_uri(tmp_path):
    src = tmp_path / "src"
    _photos(src)
    listing = tmp_path / "list.csv"
    listing.write_text(
        "uri,label\nsrc/cat/0.jpg,cat\nsrc/cat/1.jpg,cat\nsrc/cat/0.jpg,dog\nsrc/dog/0.jpg,dog\n"
    )
    out = tmp_path / "out"
    _dedup(str(listing), "--out", str(out))
    rows = [r for r in _rows(out) if r.uri.endswith("cat/0.jpg")]
    assert [(r.label, r.status, r.reason) for r in rows] == [
        ("cat", "kept", ""),
        ("dog", "rejected", "duplicate_uri"),
    ]
    assert _summary(out)["input"] == 4


def test_the_count_check_compares_two_independent_counts(tmp_path):
    from kaedama.dedup.hashing import hash_image_bytes

    config = DedupConfig()
    recs = [hash_image_bytes(f"/x/a/{i}.jpg", "a", _jpeg(i), config.recipe()) for i in range(3)]
    assert decide(recs, [], [], config, listed=3).summary["input"] == 3
    with pytest.raises(DedupError, match="!= 4 files listed"):
        decide(recs, [], [], config, listed=4)


def test_no_runner_picks_the_in_process_engine_for_local_paths_only():
    local = job.JobPaths(input="/d/in", output="/d/out", cache="/d/out/c.npz")
    remote = job.JobPaths(input="gs://b/in", output="/d/out", cache="/d/out/c.npz")
    assert choose_engine(local, [], False) == "local"
    assert choose_engine(remote, [], False) == "beam"
    assert choose_engine(local, ["--runner=DirectRunner"], False) == "beam"
    assert choose_engine(local, [], True) == "local"


# --------------------------------------------------------------------------- names


def test_line_separators_in_file_names_survive_dedup_split_and_train(tmp_path, one_torch_thread):
    src = tmp_path / "src"
    _photos(src, per_label=12, seed=7)
    odd = {"cat": "a\u2028b.jpg", "dog": "c\u2029d\x85e.jpg"}
    for label, name in odd.items():
        (src / label / name).write_bytes(_jpeg(500 + len(name)))
    dedup, split, train = (tmp_path / n for n in ("dedup", "split", "train"))
    _dedup(str(src), "--out", str(dedup))
    assert cli.main(["split", str(dedup), "--out", str(split)]) == 0
    rows = _rows(split)
    assert {Path(r.uri).name for r in rows} >= set(odd.values())
    assert all(r.split for r in rows if r.status == "kept")
    args = ["--model", "test_resnet", "--img-size", "32", "--epochs", "1", "--workers", "0"]
    assert cli.main(["train", str(split), "--out", str(train), *args]) == 0
    result = json.loads((train / "result.json").read_text())
    assert result["best_epoch"] == 1


# --------------------------------------------------------------------------- sizes


def test_a_multi_gb_file_is_rejected_without_being_read(tmp_path):
    src = tmp_path / "src"
    _photos(src)
    huge = src / "dog" / "video.jpg"
    with open(huge, "wb") as fh:  # sparse: 3 GiB on paper, no disk used
        fh.truncate(3 * 2**30)
    out = tmp_path / "out"
    code = (
        "import resource, sys\n"
        "from kaedama import cli\n"
        f"rc = cli.main(['dedup', {str(src)!r}, '--out', {str(out)!r}, '--workers', '1'])\n"
        "peak = max(resource.getrusage(w).ru_maxrss for w in "
        "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
        "print('PEAK_KB', peak)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak_kb = int(done.stdout.split("PEAK_KB")[-1].split()[0])
    # Reading the file would take >= 3 GiB; the job's own peak (imports, forked workers
    # that share them) is far below, though it varies with what the environment imports.
    assert peak_kb < 2_500_000, f"peak RSS {peak_kb} KB: the file was read"
    (row,) = [r for r in _rows(out) if r.uri.endswith("video.jpg")]
    assert (row.status, row.reason) == ("rejected", "too_large")
    assert row.bytes == 3 * 2**30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 3 * 2**20


def test_max_bytes_is_honoured_by_every_reader(tmp_path):
    from kaedama import storage

    path = tmp_path / "x.bin"
    path.write_bytes(b"x" * 1000)
    assert storage.read_bytes(str(path), max_bytes=1000) == b"x" * 1000
    with pytest.raises(storage.TooLargeError, match="over the limit of 999"):
        storage.read_bytes(str(path), max_bytes=999)
    config = DedupConfig(max_bytes=999)
    rejected = job.fingerprint((str(path), "a", ""), config, config.recipe())
    assert rejected.reason == "too_large" and rejected.bytes == 1000
    assert job.describe_file(str(path), config, config.recipe())[2] == b""
    assert job.thumbnail(str(path), 32, config) == (str(path), None)


# --------------------------------------------------------------------------- materialize


@pytest.mark.parametrize(
    "label",
    ["../../../etc", "..\\..\\..\\etc", "/etc/cron.d", "C:\\Windows\\System32", "a/../../b"],
)
def test_materialize_never_writes_outside_its_prefix(tmp_path, label):
    src = tmp_path / "data" / "src"
    _photos(src, labels=("x",), per_label=1)
    listing = tmp_path / "data" / "list.csv"
    listing.write_text(f'uri,label\nsrc/x/0.jpg,"{label}"\n', encoding="utf-8")
    prefix = tmp_path / "data" / "kept"
    out = tmp_path / "data" / "out"
    _dedup(str(listing), "--out", str(out), "--materialize", str(prefix))
    written = [p for p in tmp_path.rglob("*.jpg") if p.is_file() and "src" not in p.parts]
    assert len(written) == 1
    assert prefix in written[0].parents, f"{written[0]} is outside {prefix}"
    assert _summary(out)["materialized"]["copied"] == 1


def test_object_names_with_dot_segments_stay_inside_the_prefix(tmp_path):
    plan = job.plan_copies(
        job.DedupResult(
            rows=[
                manifest.Row(uri="gs://b/in/cat/../../../../x.jpg", label="cat", sha256="a" * 64)
            ],
            clusters=[],
            candidate_pairs=[],
            summary={},
        ),
        job.JobPaths(input="gs://b/in", output="gs://b/out", materialize=str(tmp_path / "kept")),
    )
    ((_, target),) = plan
    assert target == str(
        tmp_path / "kept" / "cat" / "%2E%2E" / "%2E%2E" / "%2E%2E" / "%2E%2E" / "x.jpg"
    )


# --------------------------------------------------------------------------- columns


def test_list_columns_and_automl_sets_reach_the_manifest_and_the_split(tmp_path):
    src = tmp_path / "src"
    _photos(src, per_label=10)
    lines = ["uri,label,ml_use,note"]
    lines += [f"src/cat/{i}.jpg,cat,{'test' if i < 2 else ''},n{i}" for i in range(10)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    automl = [f"{'TEST' if i < 3 else 'TRAIN'},src/dog/{i}.jpg,dog" for i in range(10)]
    (tmp_path / "automl.csv").write_text("\n".join(automl) + "\n")
    for name in ("list.csv", "automl.csv"):
        out = tmp_path / f"dedup-{name}"
        _dedup(str(tmp_path / name), "--out", str(out))
        assert cli.main(["split", str(out), "--out", str(tmp_path / f"split-{name}")]) == 0
    plain = {Path(r.uri).name: r for r in _rows(tmp_path / "dedup-list.csv")}
    assert plain["0.jpg"].extra == {"ml_use": "test", "note": "n0"}
    assert plain["5.jpg"].extra == {"ml_use": "", "note": "n5"}
    split = {Path(r.uri).name: r.split for r in _rows(tmp_path / "split-list.csv")}
    assert split["0.jpg"] == split["1.jpg"] == "test"
    auto = {Path(r.uri).name: r for r in _rows(tmp_path / "split-automl.csv")}
    assert [auto[f"{i}.jpg"].split for i in range(3)] == ["test"] * 3
    assert {auto[f"{i}.jpg"].split for i in range(3, 10)} == {"train"}


def test_nfc_and_nfd_spellings_of_a_label_are_one_class(tmp_path):
    src = tmp_path / "src"
    nfd = unicodedata.normalize("NFD", "ポテト")
    _photos(src, labels=("ポテト",), per_label=2)
    (src / nfd).mkdir()
    (src / nfd / "9.jpg").write_bytes(_jpeg(77))
    out = tmp_path / "out"
    _dedup(str(src), "--out", str(out))
    rows = _rows(out)
    assert {r.label for r in rows} == {"ポテト"}
    assert [r.extra.get("label_raw") for r in rows if "label_raw" in r.extra] == [nfd]
    summary = _summary(out)
    assert summary["labels_normalized"] == 1
    assert list(summary["per_label"]) == ["ポテト"]


def test_beam_and_in_process_agree_on_messy_inputs(tmp_path):
    src = tmp_path / "src"
    _photos(src)
    (src / "notes.txt").write_text("x")
    (src / "cat" / "dup.jpg").write_bytes((src / "cat" / "0.jpg").read_bytes())
    local, beam = tmp_path / "local", tmp_path / "beam"
    _dedup(str(src), "--out", str(local))
    paths = job.JobPaths(input=str(src), output=str(beam), cache=str(beam / "c.npz"))
    beam_job.run_job(paths, DedupConfig())
    for name in ("manifest.jsonl", "candidates.jsonl", "rejected.jsonl", "clusters.jsonl"):
        assert (local / name).read_bytes() == (beam / name).read_bytes(), name


def test_the_training_dataset_skips_a_multi_gb_file_unread(tmp_path):
    from kaedama.preprocess import Preprocess
    from kaedama.train.data import Example, ManifestDataset, Skipped

    huge = tmp_path / "video.jpg"
    with open(huge, "wb") as fh:
        fh.truncate(3 * 2**30)
    good = tmp_path / "a.jpg"
    good.write_bytes(_jpeg(1))
    data = ManifestDataset(
        [Example(str(huge), 0), Example(str(good), 1)], preprocess=Preprocess((3, 32, 32))
    )
    assert data[0] == Skipped(str(huge), "too_large")
    tensor, target = data[1]
    assert tuple(tensor.shape) == (3, 32, 32) and target == 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 3 * 2**20
