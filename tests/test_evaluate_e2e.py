"""``kaedama evaluate`` end to end on a small trained model, and its report in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kaedama import cli
from kaedama.evaluate import svg
from kaedama.evaluate.report import SECTIONS
from kaedama.manifest import Row, list_image_folder, write_manifest
from tests.chromium import open_page, screenshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("KAEDAMA_TEST_ARTIFACTS", REPO / "build" / "test-artifacts"))
EVIL = "<b>&\"'"
CLASSES = ("α", "三田本店", EVIL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str, Path]:
    """A 2-epoch test_resnet on real digit photos; a manifest with a leak and a corrupt image."""
    import torch

    from kaedama.fixtures import FixturesConfig, make_digits_folder
    from kaedama.train.config import TrainConfig
    from kaedama.train.loop import fit

    base = tmp_path_factory.mktemp("evaluate")
    config = FixturesConfig(classes=("a", "b", "c"), per_class=30, size=40).clean()
    make_digits_folder(base / "img", config, progress=False)
    for old, new in zip(("a", "b", "c"), CLASSES, strict=True):
        (base / "img" / old).rename(base / "img" / new.replace("/", "_"))
    rows = sorted(list_image_folder(str(base / "img")), key=lambda r: r.uri)
    seen: Counter[str] = Counter()
    for row in rows:
        k = seen[row.label] % 10
        seen[row.label] += 1
        row.split = "train" if k < 7 else "val" if k < 9 else "test"
    train0 = next(r for r in rows if r.split == "train")
    test0 = next(r for r in rows if r.split == "test")
    train0.cluster = test0.cluster = "c-leak"  # a test image with a near-duplicate in train
    bad = base / "img" / "truncated.jpg"
    bad.write_bytes((base / "img").joinpath(CLASSES[0]).iterdir().__next__().read_bytes()[:200])
    rows.append(Row(uri=str(bad), label=CLASSES[0], split="test"))
    manifest = base / "manifest.jsonl"
    write_manifest(str(manifest), rows)
    cfg = TrainConfig(
        model="test_resnet", img_size=32, epochs=2, batch_size=16, workers=0, lr=0.05,
        warmup_epochs=0.0, color_jitter=0.0, pca_noise=0.0, random_erasing=0.0, scale=(0.5, 1.0),
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    fit(str(manifest), str(base / "run"), cfg)
    torch.set_num_threads(before)
    return base / "run", str(manifest), base


FAST = ["--threads", "1", "--workers", "2", "--bootstrap", "100", "--latency-runs", "3",
        "--latency-batch", "4", "--cam-per-class", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(trained) -> tuple[Path, dict]:
    run, manifest, base = trained
    out = base / "eval"
    code = cli.main(["evaluate", str(run), manifest, "--out", str(out), "--fit-temperature", *FAST])
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_files_and_figures_agree_with_the_per_image_predictions(evaluated, trained, capsys):
    out, m = evaluated
    for name in ("metrics.json", "kfp.json", "predictions.jsonl", "predictions.csv",
                 "report.html", "temperature.json", "figures/confusion.png",
                 "figures/reliability.png", "figures/pr_curves.png",
                 "figures/training_curves.png"):  # fmt: skip
        assert (out / name).is_file(), name
    recs = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 9 == m["summary"]["images"]  # 3 per class; the corrupt one skipped
    assert [s["uri"].endswith("truncated.jpg") for s in m["skipped"]] == [True]
    assert m["summary"]["accuracy"] == pytest.approx(np.mean([r["correct"] for r in recs]))
    assert {r["label"] for r in recs} == set(CLASSES)
    assert all(sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-4) for r in recs)
    assert np.asarray(m["confusion"]["matrix"]).sum() == 9
    kfp = json.loads((out / "kfp.json").read_text())
    assert kfp["confusion_matrix"]["categories"] == sorted(CLASSES)
    assert kfp["metrics"]["accuracy"] == m["summary"]["accuracy"]
    assert m["leakage"]["with_train_duplicate"]["images"] == 1
    assert m["leakage"]["without"]["images"] == 8
    temp = json.loads((trained[0] / "temperature.json").read_text())
    assert temp["temperature"] == pytest.approx(m["temperature"]["temperature"])
    assert temp["temperature"] > 0
    assert m["latency"]["threads"] == 1 and m["latency"]["input_size"] == [3, 32, 32]
    assert m["cam"]["target_layer"] == "layer4" and m["cam"]["images"] >= 3
    assert len(list((out / "cam").glob("*.png"))) == m["cam"]["images"]


def test_compare_with_the_same_model_is_a_tie(evaluated, trained, capsys):
    out, m = evaluated
    run, manifest, base = trained
    code = cli.main(
        ["evaluate", str(run), manifest, "--out", str(base / "eval2"), "--no-report",
         "--no-latency", "--compare", str(out / "metrics.json"), *FAST]
    )  # fmt: skip
    assert code == 0
    result = json.loads((base / "eval2" / "compare.json").read_text())
    assert result["shared_images"] == 9 and result["better"] == "tie"
    assert result["mcnemar"] == {"only_this_right": 0, "only_other_right": 0, "p_value": 1.0}
    assert not result["significant"]
    assert "equally accurate" in capsys.readouterr().out
    assert not (base / "eval2" / "report.html").exists()


def test_a_split_without_rows_is_a_clear_error(trained, tmp_path, capsys):
    run, manifest, _ = trained
    text = Path(manifest).read_text().replace('"split": "test"', '"split": "val"')
    only_val = tmp_path / "m.jsonl"
    only_val.write_text(text)
    assert cli.main(["evaluate", str(run), str(only_val), "--out", str(tmp_path / "o")]) == 1
    assert "no kept rows with split 'test'" in capsys.readouterr().err


_FACTS = """JSON.stringify({
    title: document.title,
    sections: Array.from(document.querySelectorAll('section[data-section]')).map(s => s.id),
    figures: Array.from(document.querySelectorAll('svg.figure')).map(s => s.dataset.figure),
    thumbs: document.querySelectorAll('svg.thumb').length,
    cams: document.querySelectorAll('[data-cam]').length,
    images: document.images.length,
    brokenImages: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length,
    svgWidth: Math.max(...Array.from(document.querySelectorAll('svg.figure'))
        .map(s => s.getBoundingClientRect().width)),
    firstClass: document.querySelector('#per-class tbody tr td').textContent,
})"""


def test_report_opens_in_chromium_with_every_section(evaluated, tmp_path):
    out, m = evaluated
    page = out / "report.html"
    assert "<script>alert" not in page.read_text() and html.escape(EVIL) in page.read_text()
    with open_page(page, tmp_path, width=1280, height=1000) as tools:
        facts = tools.evaluate(_FACTS)
        assert tools.errors() == []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = screenshot(tools, ARTIFACTS / "evaluate-report.png", full_page=True)
        before = facts["firstClass"]
        tools.evaluate(
            "JSON.stringify(document.querySelector('#per-class th').click() || 1)"
        )  # sort by class name
        after = tools.evaluate(
            "JSON.stringify(document.querySelector('#per-class tbody tr td').textContent)"
        )
    assert facts["sections"] == [key for key, _ in SECTIONS]
    assert {"confusion", "reliability", "pr", "training-loss", "training-acc"} <= set(
        facts["figures"]
    )
    assert facts["thumbs"] >= 3 and facts["cams"] == m["cam"]["images"]
    assert facts["images"] == 0 and facts["brokenImages"] == 0  # no <img> at all: inline SVG
    assert after == sorted(CLASSES)[0] or after != before
    assert shot.stat().st_size > 10_000


def _kfp_host(report: str, tmp_path: Path, name: str) -> Path:
    """A page that shows ``report`` as KFP's HTML viewer does, under a CSP without data: images.

    KFP's HTMLViewer sets the artifact's HTML as the ``srcdoc`` of an
    ``<iframe sandbox="allow-scripts">``; a srcdoc document inherits the embedding
    page's Content-Security-Policy.
    """
    host = tmp_path / name
    host.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"img-src 'self'\">"
        "<title>kfp</title></head><body>"
        f"<iframe sandbox='allow-scripts' style='width:1200px;height:800px' "
        f'srcdoc="{html.escape(report, quote=True)}"></iframe></body></html>',
        encoding="utf-8",
    )
    return host


def _frame_facts(tools, expression: str) -> dict:
    """Evaluate inside the (out-of-process, sandboxed) iframe once its document has loaded."""
    (session,) = tools.frame_sessions()
    deadline = time.monotonic() + 30
    while tools.evaluate("JSON.stringify(document.readyState)", session) != "complete":
        assert time.monotonic() < deadline, "the iframe did not finish loading"
        time.sleep(0.1)
    return tools.evaluate(expression, session)


def test_report_renders_inside_kfps_sandboxed_iframe(evaluated, tmp_path):
    out, _ = evaluated
    host = _kfp_host((out / "report.html").read_text(encoding="utf-8"), tmp_path, "kfp.html")
    with open_page(host, tmp_path, frames=True) as tools:
        facts = _frame_facts(tools, _FACTS)
        errors = tools.errors()
    assert facts["sections"] == [key for key, _ in SECTIONS]
    assert "confusion" in facts["figures"] and facts["thumbs"] >= 3
    assert errors == []


def test_a_base64_image_is_what_breaks_in_kfps_iframe(tmp_path):
    # The control for the test above: the same host blocks a data: image (kubeflow/pipelines#10527).
    pixel = (
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
        "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    report = f"<!DOCTYPE html><html><body><img src='{pixel}'>{svg.picture(np.zeros((2, 2, 3), np.uint8), title='x')}</body></html>"
    host = _kfp_host(report, tmp_path, "kfp-base64.html")
    with open_page(host, tmp_path, frames=True) as tools:
        facts = _frame_facts(
            tools,
            "JSON.stringify({broken: Array.from(document.images).filter(i => !(i.complete && "
            "i.naturalWidth > 0)).length, svgs: document.querySelectorAll('svg').length})",
        )
        errors = tools.errors()
    assert facts == {"broken": 1, "svgs": 1}
    assert any("Content Security Policy" in e for e in errors)


def test_confusion_heatmap_stays_readable_for_120_classes():
    rng = np.random.default_rng(0)
    m = np.diag(rng.integers(5, 20, 120))
    m[3, 7] = 4
    page = svg.heatmap(m, [f"class {i}" for i in range(120)], title="t")
    width = float(page.split("width='", 1)[1].split("'", 1)[0])
    assert width <= 780  # fits the page: cells shrink, labels go to tooltips
    assert page.count("<rect") == 121 + 1  # non-empty cells only, plus the frame
    assert "true class 3, predicted class 7: 4" in page


def test_checkpoint_manifest_and_output_on_gcs(trained, gcs_bucket, capsys):
    from kaedama import storage
    from kaedama.manifest import read_manifest

    run, manifest, _ = trained
    for name in ("best.pt", "history.json"):
        storage.write_bytes(f"{gcs_bucket}/run/{name}", (run / name).read_bytes())
    rows = read_manifest(manifest).rows
    for row in rows:
        if row.split == "test":
            dst = f"{gcs_bucket}/img/{Path(row.uri).parent.name}/{Path(row.uri).name}"
            storage.write_bytes(dst, Path(row.uri).read_bytes())
            row.uri = dst
    write_manifest(f"{gcs_bucket}/split/manifest.jsonl", rows)
    out = f"{gcs_bucket}/eval"
    code = cli.main(
        ["evaluate", f"{gcs_bucket}/run", f"{gcs_bucket}/split", "--out", out, "--no-latency",
         "--cam-per-class", "1", "--bootstrap", "50", "--threads", "1", "--fit-temperature"]
    )  # fmt: skip
    assert code == 0
    m = json.loads(storage.read_text(f"{out}/metrics.json"))
    assert m["summary"]["images"] == 9 and m["model"]["checkpoint"] == f"{gcs_bucket}/run/best.pt"
    assert storage.exists(f"{out}/report.html") and storage.exists(f"{out}/figures/confusion.png")
    assert storage.exists(f"{gcs_bucket}/run/temperature.json")
    assert storage.list_files(f"{out}/cam")
