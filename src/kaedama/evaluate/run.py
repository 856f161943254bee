"""``evaluate(checkpoint, manifest, out, config)``: every figure, file and the report of one model.

DST receives ``metrics.json`` (everything), ``kfp.json`` (the confusion matrix and
scalars in the shapes KFP's ``ClassificationMetrics.log_confusion_matrix`` and
``Metrics.log_metric`` take), ``predictions.jsonl``/``.csv``, ``figures/*.png``,
``cam/*.png`` and ``report.html``; with ``fit_temperature``, ``temperature.json``
(also written beside the checkpoint, where serving looks for it).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from kaedama import storage
from kaedama.errors import KaedamaError
from kaedama.evaluate import calibration as cal
from kaedama.evaluate import figures, leakage, metrics, predictions, report, svg
from kaedama.evaluate.compare import compare, read_other
from kaedama.evaluate.config import EvaluateConfig
from kaedama.evaluate.inference import VIEWS, pick_device, predict
from kaedama.manifest import Row, read_manifest, resolve_manifest
from kaedama.preprocess import Preprocess

log = logging.getLogger(__name__)

THUMB = 40  # side of report thumbnails, pixels before scaling
TEMPERATURE_FILE = "temperature.json"


class EvaluateError(KaedamaError):
    """The evaluation cannot run on this input (no rows in the split, unknown labels...)."""


def resolve_checkpoint(uri: str) -> tuple[str, str]:
    """``(checkpoint file, its folder)`` for a checkpoint file or a training output folder."""
    if uri.endswith(".pt"):
        return uri, storage.parent(uri)
    return storage.join(uri, "best.pt"), uri.rstrip("/")


def select_rows(
    rows: list[Row], split: str, classes: tuple[str, ...]
) -> tuple[list[Row], list[dict]]:
    """Kept rows of ``split`` whose label the model knows, and the ones it does not."""
    known = set(classes)
    chosen, unknown = [], []
    for r in rows:
        if r.status != "kept" or r.split != split:
            continue
        if r.label in known:
            chosen.append(r)
        else:
            unknown.append({"uri": r.uri, "label": r.label, "error": "label unknown to the model"})
    if not chosen:
        splits = defaultdict(int)
        for r in rows:
            if r.status == "kept":
                splits[r.split or "(none)"] += 1
        raise EvaluateError(
            f"no kept rows with split {split!r} and a label the model knows; the manifest has "
            f"{dict(splits)} kept rows per split. Run 'kaedama split' first or pass --split"
        )
    return chosen, unknown


def _targets(rows: list[Row], classes: tuple[str, ...]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[r.label] for r in rows], dtype=np.int64)


def _history(folder: str) -> list[dict]:
    uri = storage.join(folder, "history.json")
    if not storage.exists(uri):
        return []
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; no training curves", uri)
        return []
    return data if isinstance(data, list) else []


def _input(pp: Preprocess, uri: str) -> np.ndarray:
    return pp(storage.read_bytes(uri), uri=uri)


def _thumbs(pp: Preprocess, uris: set[str]) -> dict[str, str]:
    out = {}
    for uri in sorted(uris):
        try:
            rgb = figures.thumbnail(figures.to_rgb(pp, _input(pp, uri)), THUMB)
        except (KaedamaError, OSError) as exc:
            log.warning("no thumbnail for %s: %s", uri, exc)
            continue
        out[uri] = svg.picture(rgb, title=uri, figure_id="thumb")
    return out


def _cam_sample(recs: list[dict], per_class: int, cap: int, seed: int) -> list[int]:
    """Indices of up to ``per_class`` correct and wrong images per class, seeded."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for i, r in enumerate(recs):
        groups[(r["label"], r["correct"])].append(i)
    chosen = []
    for key in sorted(groups):
        idx = groups[key]
        chosen.extend(rng.permutation(idx)[:per_class].tolist())
    if len(chosen) > cap:
        chosen = sorted(rng.permutation(chosen)[:cap].tolist())
    return sorted(chosen, key=lambda i: (recs[i]["label"], not recs[i]["correct"], recs[i]["uri"]))


def _gallery(model, pp, recs, classes, out_uri, cfg) -> tuple[list[dict], dict]:
    from kaedama.evaluate.cam import CamError, Explainer

    try:
        explainer = Explainer(model, pp.input_size, cfg.cam)
    except CamError as exc:
        log.warning("no CAM gallery: %s", exc)
        return [], {"error": str(exc)}
    index = {c: i for i, c in enumerate(classes)}
    items = []
    started = time.perf_counter()
    for n, i in enumerate(_cam_sample(recs, cfg.cam_per_class, cfg.cam_max, cfg.seed)):
        r = recs[i]
        try:
            x = _input(pp, r["uri"])
        except (KaedamaError, OSError) as exc:
            log.warning("no CAM for %s: %s", r["uri"], exc)
            continue
        heat = explainer(x[None], [index[r["predicted"]]])[0]
        over = figures.overlay(figures.to_rgb(pp, x), heat)
        storage.write_bytes(storage.join(out_uri, "cam", f"{n:04d}.png"), figures.png(over))
        items.append(
            {
                **{k: r[k] for k in ("uri", "label", "predicted", "confidence", "correct")},
                "png": f"cam/{n:04d}.png",
                "svg": svg.picture(figures.thumbnail(over, THUMB), title=r["uri"], figure_id="cam"),
            }
        )
    info = explainer.describe()
    info["images"] = len(items)
    info["seconds_per_image"] = (time.perf_counter() - started) / max(1, len(items))
    return items, info


def _tta_runs(model, rows, pp, device, cfg, classes) -> dict[str, Any]:
    """Accuracy, log loss and time of every TTA mode on the same images: the gain and its cost."""
    # Every mode runs afresh (the main pass warmed caches and threads), so times compare.
    runs = {
        mode: predict(
            model,
            rows,
            pp,
            device=device,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            tta=mode,
            desc=f"tta {mode}",
        )  # fmt: skip
        for mode in VIEWS
    }
    table = []
    for mode, p in runs.items():
        s = metrics.summary(_targets(p.rows, classes), p.probs, classes, 1)
        table.append(
            {"tta": mode, "views": p.views, "accuracy": s["accuracy"], "log_loss": s["log_loss"],
             "seconds": p.seconds}
        )  # fmt: skip
    base = next(t for t in table if t["tta"] == "none")
    best = max((t for t in table if t["tta"] != "none"), key=lambda t: (t["accuracy"], -t["views"]))
    return {
        "runs": table,
        "best": best["tta"],
        "accuracy_gain": best["accuracy"] - base["accuracy"],
        "cost_ratio": best["seconds"] / base["seconds"] if base["seconds"] else None,
    }


def evaluate(
    checkpoint_uri: str, manifest_uri: str, out_uri: str, cfg: EvaluateConfig
) -> dict[str, Any]:
    """Evaluate one checkpoint on one split of a manifest; returns (and writes) metrics.json."""
    from kaedama.train.model import load_trained

    started = time.perf_counter()
    # A wrong --compare path fails before minutes of inference, not after.
    other = read_other(cfg.compare) if cfg.compare else None
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    ckpt, folder = resolve_checkpoint(checkpoint_uri)
    tm = load_trained(ckpt, device=device)
    classes = tm.classes
    pp = Preprocess.from_data_config(tm.data_config)
    manifest_file = resolve_manifest(manifest_uri)
    manifest = read_manifest(manifest_file)
    rows, unknown = select_rows(manifest.rows, cfg.split, classes)
    log.info("evaluating %s on %d %s images", tm.model_name, len(rows), cfg.split)

    preds = predict(
        tm.model, rows, pp, device=device, batch_size=cfg.batch_size, workers=cfg.workers,
        tta=cfg.tta,
    )  # fmt: skip
    if not preds.rows:
        raise EvaluateError(f"none of the {len(rows)} {cfg.split} images could be read")
    y_true = _targets(preds.rows, classes)
    probs = preds.probs
    seconds_inference = preds.seconds
    cm = metrics.confusion(y_true, probs.argmax(1), len(classes))
    m: dict[str, Any] = {
        "kaedama_evaluate": 1,
        "model": {
            "name": tm.model_name,
            "checkpoint": ckpt,
            "classes": list(classes),
            "input_size": list(pp.input_size),
            "data_config": tm.data_config,
        },
        "manifest": manifest_file,
        "split": cfg.split,
        "tta": cfg.tta,
        "config": asdict(cfg),
        "summary": metrics.summary(y_true, probs, classes, cfg.top_k),
        "per_class": metrics.per_class(y_true, probs, classes),
        "thresholds": metrics.threshold_table(y_true, probs),
        "confusion": {
            **metrics.kfp_confusion(cm, classes),
            "order": metrics.confusion_order(cm),
        },
        "confused_pairs": metrics.confused_pairs(cm, classes),
        "skipped": preds.skipped + unknown,
    }
    m["calibration"] = cal.calibration(
        probs, y_true, bins=cfg.bins, bootstrap=cfg.bootstrap, seed=cfg.seed
    )
    if cfg.fit_temperature:
        m["temperature"] = _temperature(
            tm, manifest.rows, pp, device, cfg, preds, y_true, folder, out_uri
        )
    correct = probs.argmax(1) == y_true
    m["leakage"] = leakage.leakage(preds.rows, manifest.rows, correct)
    recs = predictions.records(preds.rows, probs, classes, y_true, top_k=cfg.predictions_top_k)
    files = predictions.write(out_uri, recs, classes)
    m["confused_pairs"] = predictions.pair_examples(recs, m["confused_pairs"], cfg.pair_examples)
    worst = predictions.worst_mistakes(recs, cfg.worst)
    m["worst_mistakes"] = [
        {k: r[k] for k in ("uri", "label", "predicted", "confidence")} for r in worst
    ]
    m["pr_curves"] = metrics.pr_curves(y_true, probs, classes)
    if cfg.measure_tta:
        m["tta_measurement"] = _tta_runs(tm.model, rows, pp, device, cfg, classes)
    if cfg.latency:
        sample = [storage.read_bytes(r.uri) for r in preds.rows[:8]]
        m["latency"] = _latency(tm, pp, device, cfg, sample)
    if other is not None:
        m["compare"] = compare(m, recs, *other, alpha=cfg.alpha, other_name=cfg.compare)
        storage.write_text(
            storage.join(out_uri, "compare.json"), json.dumps(m["compare"], indent=2)
        )
        files.append("compare.json")
    m["kfp"] = {
        "confusion_matrix": metrics.kfp_confusion(cm, classes),
        "metrics": metrics.kfp_scalars(m),
    }
    storage.write_text(storage.join(out_uri, "kfp.json"), json.dumps(m["kfp"], ensure_ascii=False))
    files.append("kfp.json")
    timing = {"inference_seconds": seconds_inference, "images": len(preds.rows)}
    timing["images_per_s"] = len(preds.rows) / seconds_inference if seconds_inference else None
    if cfg.report:
        t0 = time.perf_counter()
        files += _write_report(tm, pp, m, recs, cfg, folder, out_uri)
        timing["report_seconds"] = time.perf_counter() - t0
    timing["total_seconds"] = time.perf_counter() - started
    m["timing"] = timing
    m["files"] = sorted(set(files + ["metrics.json"]))
    storage.write_text(
        storage.join(out_uri, "metrics.json"), json.dumps(m, indent=1, ensure_ascii=False)
    )
    return m


def _latency(tm, pp, device, cfg, sample) -> dict:
    from kaedama.evaluate.latency import measure

    return measure(
        tm.model, pp, device=device, model_name=tm.model_name, batch=cfg.latency_batch,
        runs=cfg.latency_runs, images=sample,
    )  # fmt: skip


def _temperature(tm, all_rows, pp, device, cfg, preds, y_true, folder, out_uri) -> dict:
    val = [r for r in all_rows if r.status == "kept" and r.split == "val" and r.label in tm.classes]
    if not val:
        raise EvaluateError("--fit-temperature needs kept val rows in the manifest; none found")
    vp = predict(tm.model, val, pp, device=device, batch_size=cfg.batch_size,
                 workers=cfg.workers, desc="val (temperature)")  # fmt: skip
    fit = cal.fit_temperature(vp.logits, _targets(vp.rows, tm.classes))
    scaled = cal.apply_temperature(preds.logits, fit["temperature"])
    fit["test_ece_after"], fit["test_mce_after"] = cal.ece_mce(
        scaled.max(1), scaled.argmax(1) == y_true, cfg.bins
    )
    fit["val_images"] = len(vp.rows)
    body = json.dumps({"temperature": fit["temperature"], "fitted_on": "val",
                       "val_images": len(vp.rows), "nll_before": fit["nll_before"],
                       "nll_after": fit["nll_after"]}, indent=2)  # fmt: skip
    target = storage.join(folder, TEMPERATURE_FILE)
    storage.write_text(target, body)
    storage.write_text(storage.join(out_uri, TEMPERATURE_FILE), body)
    fit["saved_to"] = target
    return fit


def _write_report(tm, pp, m, recs, cfg, folder, out_uri) -> list[str]:
    history = _history(folder)
    fig = lambda name: storage.join(out_uri, "figures", name)  # noqa: E731
    order = m["confusion"]["order"]
    labels = [m["confusion"]["categories"][i] for i in order]
    matrix = np.asarray(m["confusion"]["matrix"])[np.ix_(order, order)]
    figures.confusion(matrix, labels, fig("confusion.png"))
    figures.reliability(m["calibration"]["reliability"], fig("reliability.png"),
                        f"ECE {m['calibration']['ece']:.4f}")  # fmt: skip
    figures.pr_curves(m["pr_curves"], fig("pr_curves.png"))
    files = ["figures/confusion.png", "figures/reliability.png", "figures/pr_curves.png"]
    if history:
        figures.training_curves(history, fig("training_curves.png"))
        files.append("figures/training_curves.png")
    gallery: list[dict] = []
    if cfg.cam != "off":
        gallery, m["cam"] = _gallery(tm.model, pp, recs, tm.classes, out_uri, cfg)
        files += [g["png"] for g in gallery]
    else:
        m["cam"] = {"error": "switched off (--cam off)"}
    worst = m["worst_mistakes"]
    pairs = m["confused_pairs"][:10]
    uris = {r["uri"] for r in worst} | {u for p in pairs for u in p["examples"]}
    page = report.render(
        m, history=history, thumbs=_thumbs(pp, uris), gallery=gallery, mistakes=worst,
        pairs=pairs, curves=m["pr_curves"],
    )  # fmt: skip
    storage.write_text(storage.join(out_uri, "report.html"), page)
    files.append("report.html")
    return files
