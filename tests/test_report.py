"""The dedup review page: pure rendering, escaping, thumbnails, and a real headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kaedama.dedup.review import cluster_order, format_summary, render_report, thumbnail_data_uri
from kaedama.images import ImageError
from kaedama.manifest import Row
from tests.chromium import open_page

EVIL = "<script>alert('x')</script>&\"'"


def _jpeg(seed: int, size=(300, 200)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).resize(size)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _member(uri: str, label: str, decision="kept", reason="", duplicate_of="", sha="") -> dict:
    return {
        "uri": uri,
        "label": label,
        "sha256": sha or hashlib.sha256(uri.encode()).hexdigest(),
        "bytes": 1234,
        "width": 300,
        "height": 200,
        "decision": decision,
        "reason": reason,
        "duplicate_of": duplicate_of,
    }


def _clusters() -> list[dict]:
    """Three clusters: a plain one, a label conflict with hostile unicode names, an exact group."""
    evil_uri = f"gs://bkt/{EVIL}/写真 1.jpg"
    return [
        {
            "id": "c000000000001",
            "labels": ["cat"],
            "conflict": False,
            "decision": "keep_one",
            "kept": ["gs://bkt/cat/a.jpg"],
            "members": [
                _member("gs://bkt/cat/a.jpg", "cat"),
                _member(
                    "gs://bkt/cat/b.jpg", "cat", "dropped", "near_duplicate", "gs://bkt/cat/a.jpg"
                ),
                _member(
                    "gs://bkt/cat/c.jpg", "cat", "dropped", "near_duplicate", "gs://bkt/cat/a.jpg"
                ),
            ],
            "exact_groups": [],
            "pairs": [
                {
                    "a": "gs://bkt/cat/a.jpg",
                    "b": "gs://bkt/cat/b.jpg",
                    "distance": 3,
                    "similarity": 0.97,
                    "confirmed": True,
                },
                {
                    "a": "gs://bkt/cat/a.jpg",
                    "b": "gs://bkt/cat/c.jpg",
                    "distance": 1,
                    "similarity": 0.99,
                    "confirmed": True,
                },
            ],
        },
        {
            "id": "c000000000002",
            "labels": ["猫", EVIL],
            "conflict": True,
            "decision": "drop_all",
            "kept": [],
            "members": [
                _member("gs://bkt/猫/x.jpg", "猫", "dropped", "label_conflict", sha="1" * 64),
                _member(evil_uri, EVIL, "dropped", "label_conflict", sha="1" * 64),
            ],
            "exact_groups": [["gs://bkt/猫/x.jpg", evil_uri]],
            "pairs": [
                {
                    "a": "gs://bkt/猫/x.jpg",
                    "b": evil_uri,
                    "distance": 0,
                    "similarity": 1.0,
                    "confirmed": True,
                }
            ],
        },
        {
            "id": "c000000000003",
            "labels": ["dog"],
            "conflict": False,
            "decision": "keep_one",
            "kept": ["gs://bkt/dog/1.jpg"],
            "members": [
                _member("gs://bkt/dog/1.jpg", "dog", sha="2" * 64),
                _member(
                    "gs://bkt/dog/2.jpg",
                    "dog",
                    "dropped",
                    "exact_duplicate",
                    "gs://bkt/dog/1.jpg",
                    sha="2" * 64,
                ),
            ],
            "exact_groups": [["gs://bkt/dog/1.jpg", "gs://bkt/dog/2.jpg"]],
            "pairs": [],
        },
    ]


SUMMARY = {
    "input": 9,
    "kept": 3,
    "dropped": 5,
    "rejected": 1,
    "by_reason": {"near_duplicate": 2, "label_conflict": 2, "exact_duplicate": 1, "empty": 1},
    "per_label": {
        "cat": {"before": 3, "after": 1, "dropped": 2, "rejected": 0},
        EVIL: {"before": 1, "after": 0, "dropped": 1, "rejected": 0},
    },
    "clusters": 3,
    "conflict_clusters": 1,
    "hash_recipe": "phash8-test",
}
ROWS = [
    Row(
        uri=f"gs://bkt/{EVIL}/empty.jpg",
        label=EVIL,
        status="rejected",
        reason="empty",
        extra={"message": "zero bytes"},
    )
]


def _thumbs() -> dict[str, str | None]:
    uris = [m["uri"] for c in _clusters() for m in c["members"]]
    thumbs = {uri: thumbnail_data_uri(_jpeg(i)) for i, uri in enumerate(uris)}
    thumbs["gs://bkt/cat/c.jpg"] = None  # an image that could not be previewed
    return thumbs


def _page() -> str:
    return render_report(_clusters(), SUMMARY, _thumbs().get, rows=ROWS)


def test_thumbnail_is_a_small_jpeg_data_uri():
    uri = thumbnail_data_uri(_jpeg(0, size=(1200, 800)), size=96)
    assert uri.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert image.format == "JPEG"
    assert max(image.size) == 96 and image.size == (96, 64)


def test_thumbnail_of_a_non_image_raises_the_decoder_error():
    with pytest.raises(ImageError) as info:
        thumbnail_data_uri(b"not an image at all")
    assert info.value.reason == "not_an_image"


def test_one_section_per_cluster_conflicts_first():
    page = _page()
    assert page.count("<section class='cluster") == 3
    order = [c["id"] for c in cluster_order(_clusters())]
    assert order == ["c000000000002", "c000000000001", "c000000000003"]
    positions = [page.index(f"data-cluster='{cid}'") for cid in order]
    assert positions == sorted(positions)
    assert "data-conflict='true'" in page


def test_everything_from_the_data_is_escaped():
    page = _page()
    assert EVIL not in page  # escaped; the page's own script is static
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;&#x27;" in page
    assert "写真 1.jpg" in page and "猫" in page  # unicode stays readable


def test_members_show_label_uri_distance_and_decision():
    page = _page()
    assert "near_duplicate" in page and "label_conflict" in page and "exact_duplicate" in page
    assert "duplicate of <span class='uri'>gs://bkt/cat/a.jpg</span> at distance 3" in page
    assert "gs://bkt/dog/1.jpg</span> at distance 0" in page
    assert page.count("<img src='data:image/jpeg;base64,") == 6
    assert page.count("no preview") == 1
    assert "data-rejected=" in page  # the rejected file is listed too


def test_empty_report_says_so():
    page = render_report([], {"input": 2, "kept": 2, "dropped": 0, "rejected": 0}, dict().get)
    assert "No duplicates found." in page and "data-cluster=" not in page


def test_format_summary_lists_reasons_and_labels():
    text = format_summary(SUMMARY)
    assert text.splitlines()[0].startswith("input 9 = kept 3 + dropped 5 + rejected 1")
    assert "near_duplicate" in text and EVIL in text


# --------------------------------------------------------------------------- Chromium


def load_in_chromium(page: Path, tmp_path: Path) -> dict:
    """Open ``page`` in headless Chromium; returns errors and DOM facts once it has loaded."""
    with open_page(page, tmp_path) as tools:
        result = tools.evaluate(
            """JSON.stringify({
                title: document.title,
                clusters: Array.from(document.querySelectorAll('section.cluster'))
                    .map(s => s.dataset.cluster),
                conflicts: document.querySelectorAll('section.cluster[data-conflict=true]').length,
                images: document.images.length,
                brokenImages: Array.from(document.images)
                    .filter(i => !(i.complete && i.naturalWidth > 0)).length,
            })"""
        )
        result["errors"] = tools.errors()
        return result


def test_chromium_loads_the_page_without_errors_one_element_per_cluster(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(_page(), encoding="utf-8")
    facts = load_in_chromium(page, tmp_path)
    assert facts["errors"] == []
    assert facts["title"] == "kaedama dedup review"
    assert facts["clusters"] == ["c000000000002", "c000000000001", "c000000000003"]
    assert facts["conflicts"] == 1
    assert facts["images"] == 6 and facts["brokenImages"] == 0


def test_chromium_check_catches_a_broken_page(tmp_path):
    # The checker itself must be able to fail: a script error and a missing image.
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><link rel='icon' href='data:,'><title>t</title></head><body>"
        "<section class='cluster' data-cluster='c1'><img src='missing.png'></section>"
        "<script>undefinedFunction()</script></body></html>",
        encoding="utf-8",
    )
    facts = load_in_chromium(page, tmp_path)
    assert any("undefinedFunction" in e for e in facts["errors"])
    assert facts["brokenImages"] == 1
