"""The clean stage's decisions on numbers: label errors, outliers, low-info rules, junk model.

Embeddings are synthetic here (the model is not the point); images for the
low-information rules are generated.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from kaedama.clean.config import CleanConfig
from kaedama.clean.decide import Finding, apply_findings, finding_records, summarise
from kaedama.clean.embedcache import EmbeddingCache, EmbeddingCacheError
from kaedama.clean.junk import JunkModel, JunkModelError, train_junk_model
from kaedama.clean.labels import LabelErrorsError, find_label_errors
from kaedama.clean.lowinfo import LowInfoThresholds, image_stats, low_info_reasons
from kaedama.clean.outliers import score_outliers
from kaedama.config import ConfigError
from kaedama.manifest import Row

LABELS = ["ant", "bee", "三田本店", "wasp"]


def clusters(rng, per_class=60, dim=32, spread=1.0, separation=3.0):
    """Gaussian class clusters: embeddings and their true labels."""
    centres = rng.normal(size=(len(LABELS), dim)) * separation
    x = np.concatenate([c + rng.normal(size=(per_class, dim)) * spread for c in centres])
    y = [label for label in LABELS for _ in range(per_class)]
    return x.astype(np.float32), y


def plant_flips(rng, y, rate):
    flipped = list(y)
    planted = rng.choice(len(y), size=int(rate * len(y)), replace=False)
    for i in planted:
        flipped[i] = rng.choice([lab for lab in LABELS if lab != y[i]])
    return flipped, set(planted.tolist())


@pytest.mark.parametrize("seed", [0, 1])
def test_label_errors_find_planted_flips(seed):
    rng = np.random.default_rng(seed)
    # Overlapping clusters: a probe is right on most, not all, clean points.
    x, truth = clusters(rng, spread=1.0, separation=1.5)
    given, planted = plant_flips(rng, truth, 0.10)
    result = find_label_errors(x, given, folds=5, seed=seed)
    found = {issue.index for issue in result.issues}
    recall = len(found & planted) / len(planted)
    precision = len(found & planted) / max(1, len(found))
    assert recall >= 0.75, (recall, precision)
    assert precision >= 0.8, (recall, precision)
    # Ranked by self-confidence, lowest first; ranks 1..n; suggestions mostly the truth.
    confidences = [issue.self_confidence for issue in result.issues]
    assert confidences == sorted(confidences)
    assert [issue.rank for issue in result.issues] == list(range(1, len(found) + 1))
    hits = [issue for issue in result.issues if issue.index in planted]
    right = sum(issue.suggested == truth[issue.index] for issue in hits)
    assert right / len(hits) >= 0.8
    assert np.allclose(
        result.self_confidence[[i.index for i in hits]], [i.self_confidence for i in hits]
    )


def test_label_errors_clean_data_flags_little():
    rng = np.random.default_rng(3)
    x, y = clusters(rng, separation=3.0)
    result = find_label_errors(x, y, folds=5)
    assert len(result.issues) <= 0.02 * len(y)


def test_label_errors_leave_out_labels_too_small_to_hold_out():
    rng = np.random.default_rng(4)
    x, y = clusters(rng, per_class=10)
    y = [*y[:-1], "lonely"]
    result = find_label_errors(x, y, folds=5)
    assert result.skipped_labels == ["lonely"]
    assert np.isnan(result.self_confidence[-1])
    assert all(issue.index != len(y) - 1 for issue in result.issues)
    with pytest.raises(LabelErrorsError, match="two labels"):
        find_label_errors(x[:10], y[:10])


def test_outlier_ranking_puts_a_planted_off_class_embedding_first():
    rng = np.random.default_rng(5)
    x, y = clusters(rng, per_class=30, separation=3.0)
    # A "bee" embedding in the middle of "ant": far from every other bee.
    stray = x[:5].mean(axis=0, keepdims=True)
    x2 = np.concatenate([x, stray])
    y2 = [*y, "bee"]
    scored = score_outliers(x2, y2, k=5)
    assert scored[0].index == len(y2) - 1
    assert scored[0].rank == 1 and scored[0].zscore > 3.5
    assert [o.rank for o in scored] == list(range(1, len(scored) + 1))
    # Only that one stands out by the usual cut-off.
    assert sum(o.zscore > 3.5 for o in scored) <= 2


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_low_information_rules_on_generated_images():
    # A "photo": smooth structure (pixel noise would average away in the thumbnail).
    yy, xx = np.mgrid[0:120, 0:160]
    wave = 127 + 100 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    photo = np.stack([wave, wave[::-1], 255 - wave], axis=-1).astype(np.uint8)
    cases = {
        "photo": (photo, []),
        "grey": (np.full((120, 160, 3), 128), ["uniform"]),
        "black": (np.zeros((120, 160, 3)), ["uniform", "dark"]),
        "dark_ramp": (
            np.broadcast_to(np.linspace(0, 30, 160)[None, :, None], (120, 160, 3)),
            ["dark"],
        ),
        "white": (np.full((100, 100, 3), 252), ["uniform", "bright"]),
        "tiny": (photo[:16, :20], ["tiny"]),
        "strip": (photo[:40, :], []),  # 4:1 is fine
        "banner": (np.tile(photo[:20, :], (1, 8, 1)), ["tiny", "extreme_aspect"]),
        "wide": (np.tile(photo[:60, :], (1, 4, 1)), ["extreme_aspect"]),
    }
    for name, (array, expected) in cases.items():
        stats = image_stats(_png(array), uri=name)
        assert stats.width == array.shape[1] and stats.height == array.shape[0]
        assert low_info_reasons(stats) == expected, (name, stats)
    # Thresholds are settings: a stricter brightness bound flags the noise photo.
    strict = LowInfoThresholds(dark=200.0)
    assert "dark" in low_info_reasons(image_stats(_png(photo)), strict)


def test_junk_model_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    x, y = clusters(rng, per_class=40, separation=2.0)
    unwanted = x[np.array(y) == "wasp"][:30]
    wanted = x[np.array(y) != "wasp"]
    model = train_junk_model(unwanted, wanted, "test_efficientnet@random0@abc")
    assert model.info["unwanted"] == 30 and model.info["cv_average_precision"] > 0.9
    path = str(tmp_path / "junk.npz")
    model.save(path)
    loaded = JunkModel.load(path)
    assert loaded.model_key == model.model_key and loaded.info == model.info
    assert loaded.threshold == model.threshold == pytest.approx(model.info["threshold"], abs=1e-6)
    assert 0.0 < model.threshold < 1.0 and model.info["cv_f1"] > 0.8
    held_out = x[np.array(y) == "wasp"][30:]
    assert np.allclose(loaded.scores(held_out), model.scores(held_out))
    assert (loaded.scores(held_out) >= 0.5).mean() >= 0.9
    assert (loaded.scores(held_out) >= loaded.threshold).mean() >= 0.9
    assert (loaded.scores(wanted) < loaded.threshold).mean() >= 0.95
    assert (loaded.scores(wanted) < 0.5).mean() >= 0.95
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(JunkModelError, match="not a kaedama junk model"):
        JunkModel.load(str(tmp_path / "bad.npz"))
    with pytest.raises(JunkModelError, match="not found"):
        JunkModel.load(str(tmp_path / "missing.npz"))
    with pytest.raises(JunkModelError, match="unwanted and wanted"):
        train_junk_model(unwanted[:0], wanted, "k")


def test_embedding_cache_round_trip_and_model_check(tmp_path):
    cache = EmbeddingCache("m@w@1")
    cache.put("a" * 64, np.arange(4))
    cache.put("b" * 64, np.ones(4))
    with pytest.raises(EmbeddingCacheError, match="4-value"):
        cache.put("c" * 64, np.ones(3))
    path = str(tmp_path / "e.npz")
    cache.save(path)
    again = EmbeddingCache.load(path, "m@w@1")
    assert len(again) == 2 and np.array_equal(again.get("a" * 64), np.arange(4, dtype=np.float32))
    assert again.get("c" * 64) is None and (again.hits, again.misses) == (1, 1)
    with pytest.raises(EmbeddingCacheError, match="not 'other'"):
        EmbeddingCache.load(path, "other")
    assert len(EmbeddingCache.load(str(tmp_path / "none.npz"), "m")) == 0


def _rows(n):
    return [
        Row(uri=f"/d/{i}.jpg", label="a" if i % 2 else "b", sha256=f"{i:064x}") for i in range(n)
    ]


def test_findings_flag_or_drop_and_counts_add_up():
    rows = _rows(6)
    rows[5] = Row(uri="/d/5.jpg", label="a", status="rejected", reason="truncated")
    findings = [
        Finding("label_error", 0, 2, 0.1, {"suggested_label": "a"}),
        Finding("label_error", 1, 1, 0.05, {"suggested_label": "b"}),
        Finding("outlier", 1, 1, 5.0, {"outlier_z": 5.0}),
        Finding("low_information", 2, 1, 2.0, {"low_info": ["dark", "uniform"]}),
    ]
    after = apply_findings(
        rows, findings, {"label_error": "flag", "outlier": "drop", "low_information": "drop"}
    )
    assert after[0].status == "kept" and after[0].extra["clean_flags"] == ["label_error"]
    assert after[1].status == "dropped" and after[1].reason == "outlier"
    assert after[1].extra["clean_flags"] == ["outlier", "label_error"]
    assert after[2].reason == "low_information" and after[3] == rows[3]
    summary = summarise(rows, after, findings)
    assert summary["before"] == {"input": 6, "kept": 5, "dropped": 0, "rejected": 1}
    assert summary["after"] == {"input": 6, "kept": 3, "dropped": 2, "rejected": 1}
    assert summary["removed_by_reason"] == {"low_information": 1, "outlier": 1}
    records = finding_records(after, findings)
    assert [(r["kind"], r["rank"]) for r in records] == [
        ("low_information", 1),
        ("outlier", 1),
        ("label_error", 1),
        ("label_error", 2),
    ]
    assert records[1]["action"] == "dropped" and records[2]["action"] == "flagged"
    json.dumps(records, ensure_ascii=False)


def test_config_checks_values():
    with pytest.raises(ConfigError):
        CleanConfig(folds=1)
    with pytest.raises(ConfigError):
        CleanConfig(junk_threshold=1.0)
    assert CleanConfig().label_errors == "flag"


def test_cross_fitting_finds_unwanted_images_hidden_in_the_wanted_side():
    from kaedama.clean.junk import cross_fitted_scores

    rng = np.random.default_rng(8)
    x, y = clusters(rng, per_class=40, separation=1.0)
    wasps = x[np.array(y) == "wasp"]
    examples, hidden = wasps[:15], wasps[15:23]
    dataset = np.concatenate([x[np.array(y) != "wasp"], hidden])
    is_hidden = np.arange(len(dataset)) >= len(dataset) - len(hidden)
    fitted = train_junk_model(examples, dataset, "k").scores(dataset)
    crossed = cross_fitted_scores(examples, dataset, "k")
    assert crossed[is_hidden].mean() > fitted[is_hidden].mean()
    # Every hidden one ranks above all but (at most) two wanted ones.
    assert crossed[is_hidden].min() > np.sort(crossed[~is_hidden])[-3]
