"""Evaluation figures against hand-computed cases and scikit-learn; calibration on known data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import softmax
from sklearn import metrics as skm

from kaedama.evaluate import calibration as cal
from kaedama.evaluate import metrics
from kaedama.evaluate.compare import compare, mcnemar
from kaedama.evaluate.leakage import leakage
from kaedama.evaluate.predictions import ordered, pair_examples, records, worst_mistakes
from kaedama.manifest import Row

CLASSES = ("cat", "dog", "三田本店")
# Four images; true 0, 1, 2, 2. Top-1 predictions 0, 2, 2, 1 -> 2 right.
Y = np.array([0, 1, 2, 2])
P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.1, 0.3, 0.6],
        [0.2, 0.2, 0.6],
        [0.1, 0.5, 0.4],
    ]
)


def test_summary_matches_hand_computed_values():
    s = metrics.summary(Y, P, CLASSES, top_k=2)
    assert s["accuracy"] == 0.5
    # Top-2: image 1 has its true class (0.3) second, image 3 too (0.4): all four right.
    assert s["top2_accuracy"] == 1.0
    # Log loss by hand: -mean(log p_true).
    assert s["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.6, 0.4])))
    # Per class: cat P=1 R=1; dog predicted once (wrong) P=0 R=0; 三田本店 P=1/2 R=1/2.
    assert s["macro"]["precision"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert s["macro"]["recall"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert s["weighted"]["f1"] == pytest.approx((1 * 1 + 0 * 1 + 0.5 * 2) / 4)


def test_summary_agrees_with_scikit_learn_on_random_data():
    rng = np.random.default_rng(0)
    n, c = 500, 7
    probs = softmax(rng.normal(size=(n, c)) * 2, axis=1)
    y = rng.integers(0, c, n)
    names = [f"c{i}" for i in range(c)]
    s = metrics.summary(y, probs, names, top_k=3)
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(y, probs.argmax(1)))
    assert s["top3_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=3))
    assert s["log_loss"] == pytest.approx(skm.log_loss(y, probs))
    rows = metrics.per_class(y, probs, names)
    report = skm.classification_report(y, probs.argmax(1), output_dict=True, zero_division=0)
    for i, row in enumerate(rows):
        assert row["f1"] == pytest.approx(report[str(i)]["f1-score"])
        assert row["support"] == report[str(i)]["support"]
        assert row["roc_auc"] == pytest.approx(skm.roc_auc_score(y == i, probs[:, i]))


def test_threshold_table_counts_answers_above_the_confidence():
    table = {r["threshold"]: r for r in metrics.threshold_table(Y, P)}
    assert table[0.0] == {
        "threshold": 0.0, "answered": 4, "coverage": 1.0, "precision": 0.5, "recall": 0.5
    }  # fmt: skip
    # At 0.55 only images 0 (0.7, right), 1 (0.6, wrong) and 2 (0.6, right) answer.
    assert table[0.55]["answered"] == 3
    assert table[0.55]["precision"] == pytest.approx(2 / 3) and table[0.55]["recall"] == 0.5
    assert table[0.99]["answered"] == 0 and table[0.99]["precision"] is None
    assert list(table) == [*(round(0.05 * i, 2) for i in range(20)), 0.99]


def test_confusion_matrix_has_no_label_cap_and_kfp_shape():
    rng = np.random.default_rng(1)
    n_classes = 120
    y = rng.integers(0, n_classes, 3000)
    pred = np.where(rng.random(3000) < 0.7, y, rng.integers(0, n_classes, 3000))
    cm = metrics.confusion(y, pred, n_classes)
    assert cm.shape == (120, 120) and cm.sum() == 3000
    names = [f"class {i}" for i in range(n_classes)]
    kfp = metrics.kfp_confusion(cm, names)
    assert kfp["categories"] == names
    assert len(kfp["matrix"]) == 120 and all(len(r) == 120 for r in kfp["matrix"])
    assert all(isinstance(v, int) for v in kfp["matrix"][0])


def test_confusion_order_puts_mutually_confused_classes_together():
    # Classes 0<->4 and 1<->3 are confused; 2 and 5 are clean.
    cm = np.diag([50, 50, 50, 50, 50, 50])
    cm[0, 4] = cm[4, 0] = 20
    cm[1, 3] = cm[3, 1] = 15
    order = metrics.confusion_order(cm)
    assert sorted(order) == list(range(6))
    pos = {c: i for i, c in enumerate(order)}
    assert abs(pos[0] - pos[4]) == 1 and abs(pos[1] - pos[3]) == 1
    pairs = metrics.confused_pairs(cm, [str(i) for i in range(6)], top=3)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("0", "4", 20), ("4", "0", 20), ("1", "3", 15)
    ]  # fmt: skip


def test_pr_curves_match_scikit_learn_average_precision():
    curves = metrics.pr_curves(Y, P, CLASSES)
    assert curves[2]["average_precision"] == pytest.approx(
        skm.average_precision_score(Y == 2, P[:, 2])
    )
    assert curves[0]["recall"][0] == 1.0 and curves[0]["precision"][-1] == 1.0


def test_ece_and_mce_by_hand():
    conf = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([1, 0, 1, 1], bool)
    ece, mce = cal.ece_mce(conf, correct, bins=10)
    # Bin 0.9: accuracy 0.5 vs 0.9 (gap 0.4, half the images); bin 0.6: 1.0 vs 0.6 (0.4).
    assert ece == pytest.approx(0.4) and mce == pytest.approx(0.4)
    assert cal.bin_index(np.array([0.0, 0.0999, 0.1, 1.0]), 10).tolist() == [0, 0, 1, 9]


def _synthetic(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two-class probabilities whose top-1 is right with probability confidence - shift."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.5, 1.0, n)
    right = rng.random(n) < np.clip(conf - shift, 0, 1)
    y = rng.integers(0, 2, n)
    pred = np.where(right, y, 1 - y)
    probs = np.empty((n, 2))
    probs[np.arange(n), pred] = conf
    probs[np.arange(n), 1 - pred] = 1 - conf
    return probs, y


def test_calibrated_model_stays_within_the_noise_floor():
    probs, y = _synthetic(400, 0.0, seed=3)
    c = cal.calibration(probs, y, bins=15, bootstrap=300, seed=0)
    assert c["ece"] > 0  # finite-sample bias: never exactly zero
    assert c["ece"] <= c["noise_floor"]["ece_p95"]
    assert not c["distinguishable_from_calibrated"]
    lo, hi = c["ece_ci95"]
    assert lo <= c["ece"] <= hi
    assert sum(b["count"] for b in c["reliability"]) == 400


def test_overconfident_model_is_flagged_and_its_ece_is_the_shift():
    probs, y = _synthetic(4000, 0.2, seed=4)
    c = cal.calibration(probs, y, bins=10, bootstrap=200, seed=0)
    assert c["distinguishable_from_calibrated"]
    assert c["ece"] == pytest.approx(0.2, abs=0.03)
    assert c["ece_ci95"][0] > c["noise_floor"]["ece_p95"]


def test_temperature_fit_recovers_the_true_temperature():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6000, 5)) * 3
    y = np.array([rng.choice(5, p=p) for p in softmax(logits / 2.0, axis=1)])
    fit = cal.fit_temperature(logits, y)
    assert fit["temperature"] == pytest.approx(2.0, rel=0.08)
    assert fit["nll_after"] < fit["nll_before"]
    probs = cal.apply_temperature(logits, fit["temperature"])
    assert probs.sum(1) == pytest.approx(np.ones(len(y)))


def test_mcnemar_exact_p_value():
    test = mcnemar([True] * 10 + [True] * 5, [False] * 10 + [True] * 5)
    assert test["only_this_right"] == 10 and test["only_other_right"] == 0
    assert test["p_value"] == pytest.approx(2 * 0.5**10)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0


def _recs(correct: list[bool]) -> list[dict]:
    return [{"uri": f"u{i}", "correct": c} for i, c in enumerate(correct)]


def test_compare_says_which_is_better_and_whether_significantly():
    ours = {
        "per_class": [{"class": "a", "precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 5}]
    }
    theirs = {"per_class": [{"class": "a", "precision": 0.7, "recall": 0.8, "f1": 0.75}]}
    clear = compare(ours, _recs([True] * 30), theirs, {f"u{i}": i >= 20 for i in range(30)})
    assert clear["better"] == "this" and clear["significant"]
    assert clear["per_class_delta"][0]["precision"] == pytest.approx(0.2)
    close = compare(ours, _recs([True] * 30), theirs, {f"u{i}": i >= 2 for i in range(30)})
    assert close["better"] == "this" and not close["significant"]
    assert "not significantly" in close["verdict"]
    worse = compare(
        ours, _recs([False] * 10 + [True] * 20), theirs, {f"u{i}": True for i in range(30)}
    )
    assert worse["better"] == "other" and worse["significant"]


def test_leakage_counts_test_images_with_a_training_duplicate_apart():
    train = [
        Row(uri="t1", label="a", split="train", cluster="c1"),
        Row(uri="t2", label="a", split="train", sha256="s" * 64),
        Row(uri="t3", label="a", split="train"),
        Row(uri="gone", label="a", split="train", cluster="c9", status="dropped"),
    ]
    test = [
        Row(uri="x1", label="a", split="test", cluster="c1"),  # same cluster
        Row(uri="x2", label="a", split="test", sha256="s" * 64),  # identical file
        Row(uri="x3", label="a", split="test", extra={"reference_uri": "t3"}),  # reference match
        Row(uri="x4", label="a", split="test", cluster="c9"),  # duplicate only of a dropped row
        Row(uri="x5", label="a", split="test"),
    ]
    out = leakage(test, train + test, np.array([True, True, True, False, True]))
    assert out["with_train_duplicate"] == {"images": 3, "accuracy": 1.0}
    assert out["without"] == {"images": 2, "accuracy": 0.5}
    assert out["by_reason"] == {"cluster": 1, "identical_file": 1, "match": 1}
    assert out["uris"] == ["x1", "x2", "x3"]


def test_records_worst_mistakes_and_pair_examples():
    rows = [Row(uri=f"u{i}", label=CLASSES[y]) for i, y in enumerate(Y)]
    full = records(rows, P, CLASSES, Y)
    assert full[1]["predicted"] == "三田本店" and not full[1]["correct"]
    assert math.isclose(sum(full[0]["probs"].values()), 1.0)
    top = records(rows, P, CLASSES, Y, top_k=2)
    assert top[0]["top_k"] == [["cat", 0.7], ["dog", 0.2]] and "probs" not in top[0]
    worst = worst_mistakes(full, 5)
    assert [r["uri"] for r in worst] == ["u1", "u3"]  # 0.6 before 0.5
    assert [r["uri"] for r in ordered(full)] == ["u1", "u3", "u0", "u2"]
    pairs = pair_examples(
        full, [{"true": "dog", "predicted": "三田本店", "count": 1, "rate": 1.0}], 3
    )
    assert pairs[0]["examples"] == ["u1"]


def test_kfp_shapes_log_into_real_kfp_artifacts():
    dsl = pytest.importorskip("kfp.dsl")
    cm = metrics.confusion(Y, P.argmax(1), 3)
    m = {
        "summary": metrics.summary(Y, P, CLASSES, top_k=2),
        "calibration": {"ece": 0.1, "mce": 0.2},
    }
    kfp = {
        "confusion_matrix": metrics.kfp_confusion(cm, CLASSES),
        "metrics": metrics.kfp_scalars(m),
    }
    classification = dsl.ClassificationMetrics(name="confusion", uri="memory://c")
    scalars = dsl.Metrics(name="metrics", uri="memory://m")
    metrics.log_kfp(kfp, classification, scalars)
    logged = classification.metadata["confusionMatrix"]
    assert [a["displayName"] for a in logged["annotationSpecs"]] == list(CLASSES)
    assert [r["row"] for r in logged["rows"]] == cm.tolist()
    assert scalars.metadata["accuracy"] == 0.5 and scalars.metadata["ece"] == 0.1
    assert scalars.metadata["macro_f1"] == pytest.approx(m["summary"]["macro"]["f1"])
