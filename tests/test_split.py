"""The split stage: stratified targets, cluster-awareness, stability, overrides, leakage."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kaedama import cli, storage
from kaedama.dedup.decide import DedupConfig, manifest_header, run_local
from kaedama.dedup.hashing import hash_image_bytes
from kaedama.manifest import SPLITS, Manifest, Row, read_manifest, write_manifest
from kaedama.split import (
    SplitConfig,
    SplitError,
    display_width,
    format_table,
    split_rows,
    targets_for,
)

# As kaedama.dedup.decide writes it: the recipe's key string.
RECIPE = "phash8-draft256-rgb16-imagehash4.3.2-pillow12.3.0"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _row(uri: str, label: str, **kw) -> Row:
    kw.setdefault("sha256", _sha(uri))
    return Row(uri=uri, label=label, **kw)


def _dataset(sizes: dict[str, int], prefix: str = "/d") -> list[Row]:
    return [
        _row(f"{prefix}/{label}/{k}.jpg", label) for label, n in sizes.items() for k in range(n)
    ]


def _counts(rows, *, status="kept") -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLITS, 0))
    for r in rows:
        if r.status == status:
            out[r.label][r.split] += 1
    return out


def _units(rows) -> list[list[int]]:
    """Connected components over cluster / sha256 / duplicate_of, by plain graph search."""
    edges: dict[int, set[int]] = defaultdict(set)
    by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.cluster:
            by_key["c", r.cluster].append(i)
        if r.sha256:
            by_key["s", r.sha256].append(i)
        by_key["u", r.uri].append(i)
    for i, r in enumerate(rows):
        if r.duplicate_of:
            for j in by_key.get(("u", r.duplicate_of), []):
                edges[i].add(j)
                edges[j].add(i)
    for (kind, _), members in by_key.items():
        if kind != "u":
            for a, b in itertools.pairwise(members):
                edges[a].add(b)
                edges[b].add(a)
    seen: set[int] = set()
    units = []
    for start in range(len(rows)):
        if start in seen:
            continue
        stack, comp = [start], []
        seen.add(start)
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in edges[i] - seen:
                seen.add(j)
                stack.append(j)
        units.append(sorted(comp))
    return units


# ---------------------------------------------------------------------------
# Targets and per-label counts


@pytest.mark.parametrize(
    ("n", "ratios", "floor", "expected"),
    [
        (10, (8, 1, 1), 1, (8, 1, 1)),
        (7, (8, 1, 1), 1, (5, 1, 1)),
        (100, (7, 2, 1), 1, (70, 20, 10)),
        (11, (7, 2, 1), 0, (8, 2, 1)),
        (10, (9, 1), 1, (9, 1, 0)),
        (1, (1, 2, 1), 1, (1, 0, 0)),
        (2, (8, 1, 1), 1, (1, 1, 0)),
        (3, (8, 1, 1), 0, (3, 0, 0)),
        (20, (8, 1, 1), 3, (14, 3, 3)),
    ],
)
def test_largest_remainder_targets(n, ratios, floor, expected):
    got = targets_for(n, SplitConfig(ratios=ratios, min_per_split=floor))
    assert tuple(got[s] for s in SPLITS) == expected
    assert sum(got.values()) == n


@pytest.mark.parametrize("ratios", [(8, 1, 1), (7, 2, 1), (9, 1), (1, 1, 1)])
def test_singletons_hit_targets_within_one_image(ratios):
    rng = random.Random(7)
    sizes = {f"class{k}": rng.randint(2, 300) for k in range(12)}
    config = SplitConfig(ratios=ratios, min_per_split=0)
    result = split_rows(_dataset(sizes), config)
    counts = _counts(result.rows)
    for label, n in sizes.items():
        for s in SPLITS:
            assert abs(counts[label][s] - n * config.weights[s]) <= 1, (label, s, counts[label])
            assert counts[label][s] == result.summary["labels"][label][s]
    if len(ratios) == 2:
        assert all(r.split != "test" for r in result.rows)


def test_clusters_hit_the_nearest_achievable_counts_within_one():
    """Against brute force over every assignment of small random cluster sets."""
    rng = random.Random(3)
    for trial in range(150):
        sizes = [rng.choice([1, 1, 1, 2, 3, 5]) for _ in range(rng.randint(1, 7))]
        rows = [
            _row(f"/t{trial}/u{u}/{k}", "a", cluster=f"c{u}" if size > 1 else "")
            for u, size in enumerate(sizes)
            for k in range(size)
        ]
        config = SplitConfig(ratios=rng.choice([(8, 1, 1), (7, 2, 1), (1, 1, 1)]))
        got = split_rows(rows, config).summary["labels"]["a"]
        target = got["target"]
        error = max(abs(got[s] - target[s]) for s in SPLITS)
        best = min(
            max(
                abs(sum(z for z, a in zip(sizes, pick, strict=True) if a == s) - target[s])
                for s in SPLITS
            )
            for pick in itertools.product(config.active, repeat=len(sizes))
        )
        assert error <= best + 1, (sizes, config.ratios, got)


# ---------------------------------------------------------------------------
# Cluster-awareness (property test)

_LABELS = ["cat", "dog", "三田本店", "niño", "🐝"]


@st.composite
def _manifests(draw):
    n = draw(st.integers(1, 60))
    rows = []
    for i in range(n):
        label = draw(st.sampled_from(_LABELS))
        cluster = draw(st.sampled_from(["", "", "", "c1", "c2", "c3", "c4", "c5"]))
        status = draw(st.sampled_from(["kept", "kept", "kept", "dropped", "rejected"]))
        # A few rows share a sha256 (exact copies) without sharing a cluster.
        sha = _sha(draw(st.sampled_from([f"own{i}", f"own{i}", f"own{i}", "copyA", "copyB"])))
        rows.append(_row(f"/p/{label}/{i}.jpg", label, cluster=cluster, status=status, sha256=sha))
    for r in rows:
        if r.status == "dropped" and draw(st.booleans()):
            r.duplicate_of = rows[draw(st.integers(0, n - 1))].uri
    ratios = draw(st.sampled_from([(8, 1, 1), (7, 2, 1), (9, 1), (1, 1, 1)]))
    seed = draw(st.integers(0, 3))
    return rows, SplitConfig(ratios=ratios, seed=seed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_manifests())
def test_no_cluster_straddles_splits(case):
    rows, config = case
    result = split_rows(rows, config)
    out = result.rows
    assert [r.uri for r in out] == [r.uri for r in rows]
    assert all(r.split == "" for r in rows)  # the input is not modified
    for unit in _units(out):
        kept = [i for i in unit if out[i].status == "kept"]
        splits = {out[i].split for i in unit}
        if kept:
            # Every member, dropped ones included, follows the unit's kept images.
            assert len(splits) == 1 and splits <= set(config.active), [out[i] for i in unit]
        else:
            assert splits == {""}
    assert not result.summary["straddling"]
    counts = _counts(out)
    for label, row in result.summary["labels"].items():
        assert {s: row[s] for s in SPLITS} == counts[label]


def test_multi_label_cluster_follows_its_majority_label_and_counts_in_each():
    rows = _dataset({"cat": 40, "dog": 40})
    mixed = [
        _row("/m/cat/1.jpg", "cat", cluster="mix"),
        _row("/m/cat/2.jpg", "cat", cluster="mix"),
        _row("/m/dog/3.jpg", "dog", cluster="mix"),
    ]
    result = split_rows(rows + mixed, SplitConfig(seed=5))
    splits = {r.split for r in result.rows if r.cluster == "mix"}
    assert len(splits) == 1
    labels = result.summary["labels"]
    assert labels["cat"]["total"] == 42 and labels["dog"]["total"] == 41
    assert sum(labels["dog"][s] for s in SPLITS) == 41


# ---------------------------------------------------------------------------
# Stability


def test_same_split_whatever_the_row_order():
    rows = _dataset({"a": 50, "b": 30})
    rows[3].cluster = rows[4].cluster = rows[40].cluster = "k"
    first = {r.uri: r.split for r in split_rows(rows).rows}
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert {r.uri: r.split for r in split_rows(shuffled).rows} == first
    other_seed = {r.uri: r.split for r in split_rows(rows, SplitConfig(seed=1)).rows}
    assert other_seed != first


def test_same_split_in_another_process(tmp_path):
    rows = _dataset({"a": 60, "b": 25, "é": 9})
    path = str(tmp_path / "m.jsonl")
    write_manifest(path, rows)
    here = [r.split for r in split_rows(read_manifest(path)).rows]
    code = (
        "import json, sys\n"
        "from kaedama.manifest import read_manifest\n"
        "from kaedama.split import split_rows\n"
        "print(json.dumps([r.split for r in split_rows(read_manifest(sys.argv[1])).rows]))\n"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run(
            [sys.executable, "-c", code, path], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == here


def test_growth_keeps_every_existing_row_and_stays_on_target():
    sizes = {"a": 400, "b": 250, "c": 90}
    old_rows = _dataset(sizes)
    for k in range(0, 60, 3):  # some clusters in the old version
        old_rows[k].cluster = old_rows[k + 1].cluster = f"old{k}"
    old = split_rows(old_rows).rows
    before = {r.uri: r.split for r in old}
    # +10%: new images, one new copy joining an old cluster, one new cluster.
    new_rows = [
        _row(f"/new/{label}/{k}.jpg", label) for label, n in sizes.items() for k in range(n // 10)
    ]
    new_rows[0].cluster = "old0"
    new_rows[1].cluster = new_rows[2].cluster = "fresh"
    grown = old_rows + new_rows
    result = split_rows(grown, previous=old)
    after = {r.uri: r.split for r in result.rows}
    assert all(after[uri] == split for uri, split in before.items())
    assert result.summary["previous"]["moved"] == 0
    assert result.summary["previous"]["new_kept_rows"] == len(new_rows)
    assert after[new_rows[0].uri] == before[old_rows[0].uri]
    counts = _counts(result.rows)
    for label in sizes:
        target = result.summary["labels"][label]["target"]
        assert all(abs(counts[label][s] - target[s]) <= 1 for s in SPLITS), (label, counts[label])
    # A fresh split of the grown data (no --previous) would move old rows: that is the point.
    fresh = {r.uri: r.split for r in split_rows(grown).rows}
    assert any(fresh[u] != s for u, s in before.items())


def test_previous_test_image_replaced_by_a_new_copy_keeps_the_cluster_in_test():
    old = split_rows(_dataset({"a": 30})).rows
    gone = next(r for r in old if r.split == "test")
    now = [_row(r.uri, r.label) for r in old]
    for r in now:
        if r.uri == gone.uri:
            r.status, r.reason, r.cluster = "dropped", "near_duplicate", "k"
            r.duplicate_of = "/d/a/new.jpg"
    now.append(_row("/d/a/new.jpg", "a", cluster="k"))
    got = {r.uri: r.split for r in split_rows(now, previous=old).rows}
    assert got["/d/a/new.jpg"] == "test" and got[gone.uri] == "test"


# ---------------------------------------------------------------------------
# Overrides


def test_split_and_ml_use_overrides_are_honoured_and_pull_their_cluster():
    rows = _dataset({"a": 50})
    rows[0].split = "test"
    rows[1].extra["ml_use"] = "TRAINING"
    rows[2].extra["ml_use"] = "validation"
    rows[3].extra["ml_use"] = "TEST"
    rows[4].extra["ml_use"] = "UNASSIGNED"
    rows[5].extra["ml_use"] = "validation"
    rows[6].cluster = rows[5].cluster = "k"  # rows[6] follows rows[5]
    result = split_rows(rows)
    got = [r.split for r in result.rows[:7]]
    assert got[:4] == ["test", "train", "val", "test"]
    assert got[5] == got[6] == "val"
    assert result.summary["fixed"]["override"] == 5
    assert result.rows[1].extra["ml_use"] == "TRAINING"  # preserved on the way out
    ignored = split_rows(rows, SplitConfig(overrides=False, seed=9))
    assert ignored.summary["fixed"]["override"] == 0


@pytest.mark.parametrize(
    ("split", "ml_use", "message"),
    [("", "holdout", "ml_use 'holdout'"), ("train", "test", "disagree")],
)
def test_bad_overrides_name_the_row(split, ml_use, message):
    rows = _dataset({"a": 5})
    rows[2].split = split
    rows[2].extra["ml_use"] = ml_use
    with pytest.raises(SplitError, match=message) as info:
        split_rows(rows)
    assert "row 3 (/d/a/2.jpg)" in str(info.value)


# ---------------------------------------------------------------------------
# Leakage against reference test sets

BASE = 0x0F0F_F0F0_3C3C_A5A5


def _ph(value: int) -> str:
    return format(value, "016x")


def _reference() -> Manifest:
    rows = [
        _row("/v1/a/t1.jpg", "a", split="test", phash=_ph(BASE)),
        _row("/v1/a/t2.jpg", "a", split="test", phash=_ph(0xFFFF_0000_FFFF_0000)),
        _row("/v1/a/tr.jpg", "a", split="train", phash=_ph(0x1234_5678_9ABC_DEF0)),
    ]
    return Manifest(header={"hash_recipe": RECIPE}, rows=rows)


def _with_leaks() -> Manifest:
    rows = _dataset({"a": 40, "b": 40}, prefix="/v2")
    for r in rows:
        r.phash = _ph(int(r.sha256[:16], 16))
    rows[0].sha256 = _reference().rows[1].sha256  # exact copy of a reference test image
    rows[1].phash = _ph(BASE ^ 0b10101)  # 3 bits from a reference test image
    rows[2].phash = _ph(0x1234_5678_9ABC_DEF0)  # copy of a reference *train* image: fine
    rows[3].cluster = rows[1].cluster = "k"  # rows[3] is a near-duplicate of rows[1]
    return Manifest(header={"hash_recipe": RECIPE}, rows=rows)


def test_reference_test_duplicates_are_forced_into_test_and_reported():
    source = _with_leaks()
    result = split_rows(source, SplitConfig(seed=2), references={"v1": _reference()})
    by_uri = {r.uri: r for r in result.rows}
    rows = source.rows
    assert by_uri[rows[0].uri].split == "test"
    assert by_uri[rows[1].uri].split == "test"
    assert by_uri[rows[3].uri].split == "test"  # follows its cluster
    report = {e["uri"]: e for e in result.summary["leakage"]}
    assert report[rows[0].uri]["match"] == "exact"
    assert report[rows[0].uri]["reference_uri"] == "/v1/a/t2.jpg"
    assert report[rows[1].uri]["match"] == "near" and report[rows[1].uri]["distance"] == 3
    assert report[rows[3].uri]["match"] == "cluster"
    assert rows[2].uri not in report
    assert all(e["action"] == "test" and e["reference"] == "v1" for e in report.values())


def test_reference_duplicates_can_be_dropped_instead():
    source = _with_leaks()
    config = SplitConfig(reference_action="drop")
    result = split_rows(source, config, references=[_reference()])
    by_uri = {r.uri: r for r in result.rows}
    for k in (0, 1, 3):
        row = by_uri[source.rows[k].uri]
        assert (row.status, row.reason, row.split) == ("dropped", "reference_test_duplicate", "")
    assert result.summary["labels"]["a"]["total"] == 37


def test_near_matching_threshold_and_exact_only_mode():
    source = _with_leaks()
    strict = split_rows(source, SplitConfig(max_distance=2), references=[_reference()])
    assert source.rows[1].uri not in {e["uri"] for e in strict.summary["leakage"]}
    exact = split_rows(source, SplitConfig(max_distance=-1), references=[_reference()])
    assert [e["match"] for e in exact.summary["leakage"]] == ["exact"]
    # By default the radius is the dedup threshold recorded in the manifest header.
    source.header["dedup"] = {"threshold": 2}
    recorded = split_rows(source, references=[_reference()]).summary
    assert recorded["max_distance"] == 2
    assert source.rows[1].uri not in {e["uri"] for e in recorded["leakage"]}


def test_a_second_signal_confirms_or_rejects_near_matches():
    source = _with_leaks()
    seen = []

    def low(pairs):
        seen.extend(pairs)
        return [0.5 for _ in pairs]

    rejected = split_rows(source, references=[_reference()], similarity=low).summary
    assert seen == [(source.rows[1].uri, "/v1/a/t1.jpg")]  # exact matches need no check
    assert [e["match"] for e in rejected["leakage"]] == ["exact"]
    assert [(u["uri"], u["similarity"]) for u in rejected["unconfirmed_near_matches"]] == [
        (source.rows[1].uri, 0.5)
    ]
    # An image that cannot be read counts as a leak: moving it is cheaper than leaking.
    unreadable = split_rows(source, references=[_reference()], similarity=lambda p: [None] * len(p))
    assert source.rows[1].uri in {e["uri"] for e in unreadable.summary["leakage"]}
    off = split_rows(source, SplitConfig(confirm=False), references=[_reference()], similarity=low)
    assert source.rows[1].uri in {e["uri"] for e in off.summary["leakage"]}


def test_phashes_from_different_recipes_are_refused():
    ref = _reference()
    ref.header = {"hash_recipe": RECIPE.replace("draft256", "full")}
    with pytest.raises(SplitError, match="different recipes"):
        split_rows(_with_leaks(), references=[ref])
    # Exact matching needs no recipe.
    assert split_rows(_with_leaks(), SplitConfig(max_distance=-1), references=[ref]).summary


# ---------------------------------------------------------------------------
# Small classes, unicode, the table


def test_small_classes_are_warned_about_and_a_single_image_goes_to_train():
    rows = _dataset({"big": 100, "pair": 2, "solo": 1})
    result = split_rows(rows, SplitConfig(min_per_split=1))
    labels = result.summary["labels"]
    assert labels["solo"]["train"] == 1 and result.summary["single_image_labels"] == ["solo"]
    assert (labels["pair"]["train"], labels["pair"]["val"], labels["pair"]["test"]) == (1, 1, 0)
    warnings = "\n".join(result.summary["warnings"])
    assert "'solo' has a single image" in warnings
    assert "'pair' has 2 images and fewer than min_per_split=1 in test" in warnings
    assert "'big'" not in warnings
    floor = split_rows(rows, SplitConfig(min_per_split=15)).summary
    assert floor["labels"]["big"]["val"] == 15 and floor["labels"]["big"]["test"] == 15


def test_table_aligns_unicode_labels():
    rows = _dataset({"三田本店": 20, "niño": 10, "🐝": 10, "cat": 30})
    table = format_table(split_rows(rows).summary)
    lines = table.splitlines()
    assert lines[0].split() == ["label", "train", "val", "test", "total"]
    # Every row with a total column ends at the same terminal column (share/target have none).
    widths = {display_width(line) for line in lines if not line.startswith(("share", "target"))}
    assert len(widths) == 1, table
    assert any(line.startswith("三田本店 ") for line in lines)
    assert lines[-1].split()[0] == "target"


# ---------------------------------------------------------------------------
# The command


def _write(path, rows, header=None) -> str:
    write_manifest(str(path), rows, header)
    return str(path)


def test_cli_writes_manifest_and_summary_and_prints_the_table(tmp_path, capsys):
    src = _write(tmp_path / "in.jsonl", _dataset({"ants": 30, "bees": 20, "三田本店": 5}))
    out = tmp_path / "out"
    assert cli.main(["split", src, "--out", str(out), "--ratios", "7,2,1", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert "ants" in printed and "三田本店" in printed and "70.0%" in printed
    written = read_manifest(str(out / "manifest.jsonl"))
    assert written.header["split"]["config"]["ratios"] == [7.0, 2.0, 1.0]
    summary = json.loads((out / "split_summary.json").read_text(encoding="utf-8"))
    assert summary["labels"]["ants"]["train"] == 21 and summary["labels"]["ants"]["val"] == 6
    assert "三田本店" in (out / "split_summary.json").read_text(encoding="utf-8")
    assert {r.split for r in written.rows} == {"train", "val", "test"}


def test_cli_previous_and_reference(tmp_path, capsys):
    v1 = tmp_path / "v1"
    src = _write(tmp_path / "v1.jsonl", _dataset({"a": 50, "b": 20}))
    assert cli.main(["split", src, "--out", str(v1)]) == 0
    old = read_manifest(str(v1 / "manifest.jsonl")).rows
    grown = _dataset({"a": 50, "b": 20}) + _dataset({"a": 5, "b": 2}, prefix="/new")
    src2 = _write(tmp_path / "v2.jsonl", grown)
    v2 = tmp_path / "v2"
    assert cli.main(["split", src2, "--out", str(v2), "--previous", str(v1)]) == 0
    rows = {r.uri: r.split for r in read_manifest(str(v2 / "manifest.jsonl")).rows}
    assert all(rows[r.uri] == r.split for r in old)
    assert json.loads((v2 / "split_summary.json").read_text())["previous"]["moved"] == 0
    # A new copy (other URI, same bytes) of a v1 test image, split without --previous.
    test_image = next(r for r in old if r.split == "test")
    copy = _row("/elsewhere/copy.jpg", test_image.label, sha256=test_image.sha256)
    src3 = _write(tmp_path / "v3.jsonl", [*_dataset({"a": 40, "b": 40}, prefix="/v3"), copy])
    v3 = tmp_path / "v3"
    capsys.readouterr()
    assert cli.main(["split", src3, "--out", str(v3), "--reference", str(v1)]) == 0
    assert "leak: /elsewhere/copy.jpg exact-duplicates" in capsys.readouterr().err
    rows = {r.uri: r.split for r in read_manifest(str(v3 / "manifest.jsonl")).rows}
    assert rows["/elsewhere/copy.jpg"] == "test"
    leakage = json.loads((v3 / "split_summary.json").read_text())["leakage"]
    assert [(e["uri"], e["reference_uri"], e["action"]) for e in leakage] == [
        ("/elsewhere/copy.jpg", test_image.uri, "test")
    ]


def test_cli_bad_row_fails_with_its_line_number(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"uri": "/d/a/1.jpg", "label": "a"})
    path.write_text(
        '{"kaedama_manifest": {"version": 1}}\n' + good + "\n" + '{"uri": "/d/a/2.jpg"}\n'
    )
    assert cli.main(["split", str(path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "kaedama split: error:" in err and f"{path}:3" in err and "'label'" in err
    assert not (tmp_path / "o").exists()


def test_cli_bad_config_is_a_clear_error(tmp_path, capsys):
    src = _write(tmp_path / "in.jsonl", _dataset({"a": 5}))
    assert cli.main(["split", src, "--out", str(tmp_path / "o"), "--ratios", "1,2,3,4"]) == 1
    assert "ratios must have 2" in capsys.readouterr().err
    assert cli.main(["split", src, "--out", str(tmp_path / "o"), "--set", "seed=x"]) == 1
    assert "seed" in capsys.readouterr().err


def test_cli_on_gcs(gcs_bucket, tmp_path, capsys):
    src = f"{gcs_bucket}/in/manifest.jsonl"
    write_manifest(src, _dataset({"a": 20, "b": 10}))
    assert cli.main(["split", f"{gcs_bucket}/in", "--out", f"{gcs_bucket}/out"]) == 0
    rows = read_manifest(f"{gcs_bucket}/out/manifest.jsonl").rows
    assert len(rows) == 30 and all(r.split for r in rows)
    summary = json.loads(storage.read_text(f"{gcs_bucket}/out/split_summary.json"))
    assert summary["totals"]["total"] == 30


@pytest.mark.shared
def test_real_photos_split_on_target(shared_datasets):
    root = shared_datasets / "hymenoptera"
    rows = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            rows.append(Row(uri=str(path), label=path.parent.name, sha256=sha))
    result = split_rows(rows)
    for label, c in result.summary["labels"].items():
        assert all(abs(c[s] - c["target"][s]) <= 1 for s in SPLITS), (label, c)
    assert result.rows == split_rows(list(reversed(rows))).rows[::-1]


def _hashed_manifest(paths_and_labels, path) -> str:
    """A manifest made by the real dedup core (hash recipe in the header) for these files."""
    config = DedupConfig()
    records = [
        hash_image_bytes(str(p), label, p.read_bytes(), config.recipe(), describe=True)
        for p, label in paths_and_labels
    ]
    write_manifest(str(path), run_local(records, [], config).rows, manifest_header(config))
    return str(path)


def test_cli_confirms_near_matches_with_the_images_themselves(digits_folder, tmp_path, capsys):
    originals = sorted(p for p in digits_folder.rglob("*") if p.is_file())
    v1_manifest = _hashed_manifest([(p, p.parent.name) for p in originals], tmp_path / "v1.jsonl")
    assert cli.main(["split", v1_manifest, "--out", str(tmp_path / "v1")]) == 0
    v1 = read_manifest(str(tmp_path / "v1" / "manifest.jsonl"))
    test_row = next(r for r in v1.rows if r.split == "test")
    train_rows = [r for r in v1.rows if r.split == "train"][:12]
    # v2: a resized, re-encoded copy of a v1 test image, the same of a train image, and
    # exact copies of other train images.
    new = tmp_path / "new"
    entries = []
    for k, row in enumerate([test_row, *train_rows]):
        target = new / row.label / f"n{k}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(row.uri) as im:
            img = im.convert("RGB")
            if k < 2:
                img = img.resize((img.width * 9 // 10, img.height * 9 // 10))
            img.save(target, quality=85)
        entries.append((target, row.label))
    v2_manifest = _hashed_manifest(entries, tmp_path / "v2.jsonl")
    copy_uri = str(new / test_row.label / "n0.jpg")
    capsys.readouterr()
    args = [
        "split",
        v2_manifest,
        "--out",
        str(tmp_path / "v2"),
        "--reference",
        str(tmp_path / "v1"),
    ]
    assert cli.main(args) == 0
    assert f"leak: {copy_uri} near-duplicates {test_row.uri}" in capsys.readouterr().err
    summary = json.loads((tmp_path / "v2" / "split_summary.json").read_text())
    (leak,) = summary["leakage"]
    assert leak["uri"] == copy_uri and leak["action"] == "test"
    assert leak["similarity"] >= 0.9 and leak["distance"] <= 4
    got = {r.uri: r.split for r in read_manifest(str(tmp_path / "v2" / "manifest.jsonl")).rows}
    assert got[copy_uri] == "test"
    # A stricter second signal than this copy reaches: reported as unconfirmed, not moved.
    strict = ["--confirm-threshold", str(leak["similarity"] + 1e-4), "--out", str(tmp_path / "s")]
    assert cli.main([*args[:2], "--reference", str(tmp_path / "v1"), *strict]) == 0
    summary = json.loads((tmp_path / "s" / "split_summary.json").read_text())
    assert summary["leakage"] == []
    assert [u["uri"] for u in summary["unconfirmed_near_matches"]] == [copy_uri]
