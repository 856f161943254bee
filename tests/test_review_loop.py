"""The review loop: act on the page in headless Chromium, download decisions, apply them."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from kaedama import cli
from kaedama.dedup import decisions
from kaedama.dedup.decide import DedupConfig, decide
from kaedama.dedup.hashing import ImageRecord
from kaedama.manifest import read_manifest
from tests.chromium import DevTools, open_page
from tests.test_sameshot import scene


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _rows(out: Path) -> dict[str, dict]:
    return {Path(r.uri).name: r.to_json() for r in read_manifest(str(out / "manifest.jsonl")).rows}


def test_decisions_file_round_trip_and_errors(tmp_path):
    sha = "ab" * 32
    made = {sha: decisions.Decision("label", "三田本店"), "cd" * 32: decisions.Decision("keep")}
    assert decisions.parse(decisions.to_json(made)) == made
    for bad, message in [
        ("{", "not JSON"),
        ('{"decisions": {}}', "not a kaedama decisions file"),
        ('{"kaedama_decisions": 1, "decisions": {"x": {"action": "keep"}}}', "sha256"),
        (f'{{"kaedama_decisions": 1, "decisions": {{"{sha}": {{"action": "burn"}}}}}}', "one of"),
        (f'{{"kaedama_decisions": 1, "decisions": {{"{sha}": {{"action": "label"}}}}}}', "label"),
    ]:
        with pytest.raises(decisions.DecisionsError, match=message):
            decisions.parse(bad)
    with pytest.raises(decisions.DecisionsError, match="cannot read"):
        decisions.load(str(tmp_path / "missing.json"))


def _rec(uri: str, label: str, sha: str, w: int = 100) -> ImageRecord:
    return ImageRecord(uri, label, sha, 1000, w, w, 0, b"", 0.0)


def test_each_action_applied_by_decide():
    a, b, c, d = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    records = [
        _rec("x/a.jpg", "cat", a, 200),
        _rec("x/b.jpg", "cat", b),
        _rec("x/c.jpg", "cat", c),
        _rec("x/d.jpg", "cat", d),
    ]
    pairs = [("x/a.jpg", "x/b.jpg", 0), ("x/a.jpg", "x/c.jpg", 0)]
    config = DedupConfig(confirm=False)
    plain = {r.uri: r for r in decide(records, [], pairs, config).rows}
    assert plain["x/b.jpg"].status == plain["x/c.jpg"].status == "dropped"
    person = {
        b: decisions.Decision("keep"),
        c: decisions.Decision("not_duplicate"),
        d: decisions.Decision("unwanted"),
        a: decisions.Decision("label", "lion"),
    }
    rows = {r.uri: r for r in decide(records, [], pairs, config, decisions=person).rows}
    # a is relabelled: a cat/lion cluster with b, dropped as a conflict; b stays (keep)
    assert rows["x/a.jpg"].label == "lion" and rows["x/a.jpg"].reason == "label_conflict"
    assert rows["x/b.jpg"].status == "kept" and rows["x/b.jpg"].extra["decided"] == "keep"
    assert rows["x/c.jpg"].status == "kept" and not rows["x/c.jpg"].cluster
    assert (rows["x/d.jpg"].status, rows["x/d.jpg"].reason) == ("dropped", "unwanted")
    assert {uri: r.extra.get("decided") for uri, r in rows.items()} == {
        "x/a.jpg": "label",
        "x/b.jpg": "keep",
        "x/c.jpg": "not_duplicate",
        "x/d.jpg": "unwanted",
    }


def _evaluate(tools: DevTools, expression: str):
    result = tools.call("Runtime.evaluate", expression=expression, returnByValue=True)
    if "exceptionDetails" in result:
        raise AssertionError(result["exceptionDetails"])
    return result["result"].get("value")


def test_review_page_decisions_download_and_rerun(tmp_path):
    """Load the page, click two actions, download the file, re-run: the decisions apply."""
    src = tmp_path / "in"
    (src / "cats").mkdir(parents=True)
    (src / "dogs").mkdir()
    photo = scene(11)
    (src / "cats" / "a.jpg").write_bytes(_jpeg(photo))
    (src / "cats" / "b.jpg").write_bytes(_jpeg(photo.resize((160, 120), Image.Resampling.LANCZOS)))
    (src / "dogs" / "c.jpg").write_bytes(_jpeg(scene(12)))
    first = tmp_path / "first"
    assert cli.main(["dedup", str(src), "--out", str(first), "--workers", "1"]) == 0
    rows = _rows(first)
    assert rows["b.jpg"]["status"] == "dropped" and rows["b.jpg"]["reason"] == "near_duplicate"

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with open_page(first / "report.html", tmp_path, downloads=downloads) as tools:
        count = _evaluate(
            tools,
            """(() => {
                const fig = (name) => document.querySelector(
                    `figure[data-uri$="/${name}"]`);
                fig("b.jpg").querySelector("button[data-action=keep]").click();
                fig("a.jpg").querySelector("input.relabel").value = "kittens";
                fig("a.jpg").querySelector("button[data-action=label]").click();
                document.getElementById("download-decisions").click();
                return document.getElementById("decision-count").textContent;
            })()""",
        )
        assert count == "2"
        saved = downloads / "decisions.json"
        deadline = time.monotonic() + 30
        while not saved.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert saved.exists(), list(downloads.iterdir())
        assert tools.errors() == []

    made = decisions.load(str(saved))
    assert sorted(d.action for d in made.values()) == ["keep", "label"]
    second = tmp_path / "second"
    args = ["dedup", str(src), "--out", str(second), "--workers", "1", "--decisions", str(saved)]
    assert cli.main(args) == 0
    rows = _rows(second)
    assert rows["b.jpg"]["status"] == "kept" and rows["b.jpg"]["decided"] == "keep"
    assert rows["a.jpg"]["label"] == "kittens" and rows["a.jpg"]["decided"] == "label"
    assert rows["a.jpg"]["reason"] == "label_conflict"  # cats vs kittens, drop_all
    assert "decided" not in rows["c.jpg"]
    # keyed by content: the same decisions survive a renamed file in a re-listed folder
    (src / "cats" / "b.jpg").rename(src / "cats" / "b-renamed.jpg")
    third = tmp_path / "third"
    args = ["dedup", str(src), "--out", str(third), "--workers", "1", "--decisions", str(saved)]
    assert cli.main(args) == 0
    assert _rows(third)["b-renamed.jpg"]["decided"] == "keep"
