"""Batch prediction: in process, on the DirectRunner and on the DaskRunner, same files.

All class probabilities equal the in-process torch model's on the same images (the
exported model and the checkpoint preprocess alike); unreadable files are rejected
with their reason and never fail the job; predicted + rejected = listed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from beam import predict as beam_predict
from kaedama import cli
from kaedama.serve.batch import BatchPredictConfig, predict_in_process

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


@pytest.fixture(scope="module")
def photos(tmp_path_factory, serving_images) -> tuple[Path, dict[str, int]]:
    """A folder of the serving images under unicode names, plus four bad entries."""
    root = tmp_path_factory.mktemp("batch") / "photos"
    (root / "三田本店").mkdir(parents=True)
    index = {}
    for i, data in enumerate(serving_images):
        path = root / ("三田本店" if i % 2 else "") / f"写真 {i}.jpg"
        path.write_bytes(data)
        index[str(path)] = i
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not a photo")
    (root / "cut.jpg").write_bytes(serving_images[0][: len(serving_images[0]) // 2])
    (root / "gone.jpg").symlink_to(root / "nowhere.jpg")
    return root, index


def _read(out: Path) -> tuple[dict[str, dict], dict[str, str], dict]:
    preds, rejected = {}, {}
    for path in sorted(out.glob("predictions-*.jsonl")):
        for line in path.read_text("utf-8").splitlines():
            rec = json.loads(line)
            preds[rec["uri"]] = rec
    for path in sorted(out.glob("rejected-*.jsonl")):
        for line in path.read_text("utf-8").splitlines():
            rec = json.loads(line)
            rejected[rec["uri"]] = rec["reason"]
    return preds, rejected, json.loads((out / "summary.json").read_text())


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.glob("*.jsonl")}


def test_in_process_predicts_all_classes_and_rejects_bad_files(
    photos, serving_model, serving_expected, tmp_path
):
    root, index = photos
    out = tmp_path / "out"
    summary = predict_in_process(str(root), str(serving_model), str(out), BatchPredictConfig())
    preds, rejected, written = _read(out)
    assert summary == written
    assert (summary["listed"], summary["predicted"], summary["rejected"]) == (10, 6, 4)
    assert rejected == {
        str(root / "empty.jpg"): "empty",
        str(root / "notes.txt"): "not_an_image",
        str(root / "cut.jpg"): "truncated",
        str(root / "gone.jpg"): "unreadable",
    }
    classes = summary["model"]["classes"]
    for uri, i in index.items():
        rec = preds[uri]
        probs = rec["probabilities"]
        assert list(probs) == sorted(probs, key=probs.get, reverse=True), "most likely first"
        assert len(probs) == len(classes) and abs(sum(probs.values()) - 1) < 1e-4
        got = np.array([probs[c] for c in classes])
        np.testing.assert_allclose(got, serving_expected[i], atol=2e-4)
        assert rec["label"] == classes[int(np.argmax(serving_expected[i]))]
        assert rec["model_version"] == "7"


def test_top_k_and_shards(photos, serving_model, tmp_path):
    root, _ = photos
    out = tmp_path / "out"
    config = BatchPredictConfig(top_k=1, shards=3)
    predict_in_process(str(root), str(serving_model), str(out), config)
    names = sorted(p.name for p in out.glob("*.jsonl"))
    assert names == [
        f"{k}-{s:05d}-of-00003.jsonl" for k in ("predictions", "rejected") for s in range(3)
    ]
    preds, _, _ = _read(out)
    assert len(preds) == 6 and all(len(r["probabilities"]) == 1 for r in preds.values())


@pytest.mark.slow
def test_beam_runners_write_what_the_in_process_engine_writes(photos, serving_model, tmp_path):
    root, _ = photos
    config = BatchPredictConfig(max_batch_size=4, shards=2)
    local = tmp_path / "local"
    predict_in_process(str(root), str(serving_model), str(local), config)
    direct = tmp_path / "direct"
    beam_predict.run_job(str(root), str(serving_model), str(direct), config)
    assert _files(direct) == _files(local)
    assert _read(direct)[2] == _read(local)[2]
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        dask = tmp_path / "dask"
        beam_predict.run_job(
            str(root),
            str(serving_model),
            str(dask),
            config,
            [f"--runner={DASK_RUNNER}", f"--dask_client_address={cluster.scheduler_address}"],
        )
    assert _files(dask) == _files(local)


def test_cli_picks_the_engine_and_refuses_a_missing_model(photos, serving_model, tmp_path, capsys):
    root, _ = photos
    out = tmp_path / "out"
    args = ["predict-batch", str(root), "--model", str(serving_model), "--out", str(out)]
    assert cli.main([*args, "--top-k", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {
        "listed": 10,
        "predicted": 6,
        "rejected": 4,
    }
    assert cli.main(["predict-batch", str(root), "--model", str(tmp_path), "--out", str(out)]) == 1
    assert "kaedama export" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "nothing")
