"""The manifest contract: validation with line numbers, round trips, labels from folders."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import pytest

from kaedama import manifest
from kaedama.manifest import ManifestError, Row


def _rows():
    return [
        Row(
            uri="/d/三田本店/写真 1.jpg",
            label="三田本店",
            sha256="ab" * 32,
            bytes=10,
            width=4,
            height=3,
            phash="c3a1000000000000",
            cluster="c1",
            split="train",
        ),
        Row(
            uri="/d/cats/b.png",
            label="cats",
            status="dropped",
            reason="near_duplicate",
            duplicate_of="/d/三田本店/写真 1.jpg",
            cluster="c1",
            extra={"ml_use": "test"},
        ),
        Row(uri="/d/cats/c.txt", label="cats", status="rejected", reason="not_an_image"),
    ]


def test_round_trip_keeps_every_field_header_and_unicode(tmp_path):
    path = str(tmp_path / "m.jsonl")
    header = {"hash_recipe": {"algorithm": "phash", "key": "phash8"}, "stage": "dedup"}
    manifest.write_manifest(path, _rows(), header)
    text = (tmp_path / "m.jsonl").read_text(encoding="utf-8")
    assert "三田本店" in text  # readable by a person, not \u-escaped
    got = manifest.read_manifest(path)
    assert got.rows == _rows()
    assert got.header["hash_recipe"] == header["hash_recipe"]
    assert got.header["version"] == manifest.FORMAT_VERSION


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"label": "a"}', "'uri'"),
        ('{"uri": "x", "label": 3}', "'label'"),
        ('{"uri": "x", "label": "a", "width": -1}', "'width'"),
        ('{"uri": "x", "label": "a", "width": "12"}', "'width'"),
        ('{"uri": "x", "label": "a", "status": "maybe"}', "status"),
        ('{"uri": "x", "label": "a", "split": "holdout"}', "split"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_row_fails_with_its_line_number(tmp_path, line, message):
    good = json.dumps({"uri": "/a/b.jpg", "label": "a"})
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([good, good, line, good]) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        manifest.read_manifest(str(path))
    assert info.value.line == 3
    assert f"{path}:3" in str(info.value)
    assert message in str(info.value)


def test_header_must_come_first_and_version_is_checked(tmp_path):
    path = tmp_path / "m.jsonl"
    row = json.dumps({"uri": "/a/b.jpg", "label": "a"})
    path.write_text(row + "\n" + json.dumps({"kaedama_manifest": {}}) + "\n")
    with pytest.raises(ManifestError, match=":2: the header must be the first line"):
        manifest.read_manifest(str(path))
    path.write_text(json.dumps({"kaedama_manifest": {"version": 99}}) + "\n")
    with pytest.raises(ManifestError, match="version 99"):
        manifest.read_manifest(str(path))


def test_image_folder_labels_from_parent_folder(tmp_path):
    for rel in ["三田本店/写真 1.jpg", "cats/a.png", "cats/noext", "dogs/sub/x.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    rows = manifest.list_image_folder(str(tmp_path))
    got = {r.uri.replace(str(tmp_path) + "/", ""): r.label for r in rows}
    assert got == {
        "三田本店/写真 1.jpg": "三田本店",
        "cats/a.png": "cats",
        "cats/noext": "cats",  # listed whatever the extension: content decides later
        "dogs/sub/x.jpg": "sub",
    }


def test_image_folder_lists_stray_and_special_entries_as_rejected_rows(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.jpg").write_bytes(b"xyz")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "README.txt").write_text("read me")
    (tmp_path / "cats" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    os.mkfifo(tmp_path / "cats" / "pipe.jpg")
    rows = {Path(r.uri).name: r for r in manifest.list_image_folder(str(tmp_path))}
    assert sorted(rows) == [".DS_Store", "README.txt", "a.jpg", "gone.jpg", "pipe.jpg"]
    assert (rows["a.jpg"].status, rows["a.jpg"].label, rows["a.jpg"].bytes) == ("kept", "cats", 3)
    for name in (".DS_Store", "README.txt"):
        assert (rows[name].status, rows[name].reason) == ("rejected", manifest.NO_LABEL)
    for name in ("gone.jpg", "pipe.jpg"):
        assert (rows[name].status, rows[name].reason) == ("rejected", manifest.NOT_A_FILE)
        assert rows[name].label == "cats"


def test_labels_are_nfc_normalised_and_the_listed_spelling_kept(tmp_path):
    nfd = unicodedata.normalize("NFD", "ポテト")
    assert nfd != "ポテト"
    for label in (nfd, "ポテト"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "a.jpg").write_bytes(b"x")
    rows = manifest.list_image_folder(str(tmp_path))
    assert {r.label for r in rows} == {"ポテト"}
    assert sorted(r.extra.get("label_raw", "") for r in rows) == ["", nfd]
    listing = tmp_path / "list.csv"
    listing.write_text(f"uri,label\n{nfd}/a.jpg,{nfd}\n", encoding="utf-8")
    (row,) = manifest.read_list(str(listing))
    assert (row.label, row.extra["label_raw"]) == ("ポテト", nfd)


def test_automl_csv_layout_becomes_ml_use(tmp_path):
    listing = tmp_path / "automl.csv"
    listing.write_text(
        "TRAIN,gs://b/a.jpg,cat\nvalidation,gs://b/b.jpg,dog\nTEST,gs://b/c.jpg,cat\n"
        "UNASSIGNED,gs://b/d.jpg,dog\ngs://b/e.jpg,cat\n"
    )
    rows = manifest.read_list(str(listing))
    assert [(r.uri, r.label, r.extra.get("ml_use")) for r in rows] == [
        ("gs://b/a.jpg", "cat", "training"),
        ("gs://b/b.jpg", "dog", "validation"),
        ("gs://b/c.jpg", "cat", "test"),
        ("gs://b/d.jpg", "dog", None),
        ("gs://b/e.jpg", "cat", None),
    ]


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_line_separators_in_names_round_trip(sep):
    rows = [Row(uri=f"/d/cat/a{sep}b.jpg", label=f"c{sep}t"), Row(uri="/d/cat/c.jpg", label="cat")]
    text = manifest.dumps_manifest(rows)
    assert sep not in text and text.count("\n") == 3
    assert [(r.uri, r.label) for r in manifest.parse_manifest(text).rows] == [
        (r.uri, r.label) for r in rows
    ]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (Row(uri="", label="cat"), "uri"),
        (Row(uri="a.jpg", label="cat", status="deleted"), "status"),
        (Row(uri="a.jpg", label="cat", split="holdout"), "split"),
        (Row(uri="a.jpg", label="cat", bytes=-1), "bytes"),
    ],
)
def test_the_writer_refuses_rows_the_reader_would_refuse(tmp_path, row, message):
    with pytest.raises(ManifestError, match=message):
        manifest.write_manifest(str(tmp_path / "m.jsonl"), [row])
    assert not (tmp_path / "m.jsonl").exists()


def test_csv_and_jsonl_lists(tmp_path):
    (tmp_path / "list.csv").write_text(
        "uri,label,ml_use\nimgs/1.jpg,三田本店,test\n/abs/2.jpg,dogs,\n", encoding="utf-8"
    )
    rows = manifest.read_input(str(tmp_path / "list.csv"))
    assert [(r.uri, r.label) for r in rows] == [
        (f"{tmp_path}/imgs/1.jpg", "三田本店"),
        ("/abs/2.jpg", "dogs"),
    ]
    assert rows[0].extra == {"ml_use": "test"}
    (tmp_path / "list.jsonl").write_text(
        json.dumps({"uri": "gs://b/x.jpg", "label": "a"}) + "\n{broken\n", encoding="utf-8"
    )
    with pytest.raises(ManifestError) as info:
        manifest.read_input(str(tmp_path / "list.jsonl"))
    assert info.value.line == 2


def test_csv_without_header_and_short_rows(tmp_path):
    (tmp_path / "l.csv").write_text("a.jpg,cats\nb.jpg\n")
    with pytest.raises(ManifestError, match=r"l.csv:2: expected at least two columns"):
        manifest.read_list(str(tmp_path / "l.csv"))


def test_count_by():
    rows = _rows()
    assert manifest.count_by(rows, "label") == {"三田本店": 1, "cats": 2}
    assert manifest.count_by(rows, "label", "status")[("cats", "rejected")] == 1
