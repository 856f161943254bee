"""``kaedama export``: the artifact reproduces the checkpoint, carries its preprocessing,
and is verified on load."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

from kaedama.preprocess import Preprocess
from kaedama.serve.artifact import ArtifactError, load_artifact, read_card, sha256
from kaedama.serve.config import ExportConfig, ServeConfig
from kaedama.serve.export import ExportError, cam_head, export_checkpoint
from kaedama.serve.model import ImageClassifier, softmax
from tests.plugins.serving import CLASSES, run_server


def test_onnx_artifact_carries_everything_serving_needs(
    serving_model, serving_checkpoint, serving_images, serving_expected
):
    from kaedama.train.checkpoint import load_checkpoint

    meta = json.loads((serving_model / "kaedama-model.json").read_text())
    ckpt = load_checkpoint(str(serving_checkpoint))
    assert meta["runtime"] == "onnx" and meta["name"] == "tiny" and meta["version"] == "7"
    assert meta["classes"] == list(CLASSES)
    assert meta["data_config"] == ckpt["data_config"]
    assert meta["outputs"] == {"logits": "logits", "features": "features"}
    for name, digest in meta["files"].items():
        assert sha256((serving_model / name).read_bytes()) == digest
    assert meta["verify"]["max_abs_diff"] < 1e-3
    artifact = load_artifact(str(serving_model))
    assert artifact.preprocess == Preprocess.from_data_config(ckpt["data_config"])
    assert artifact.cam is not None and artifact.cam.weight.shape == (3, 512)
    # ONNX Runtime on the checkpoint's preprocessing equals torch (computed in-process).
    model = ImageClassifier(str(serving_model), ServeConfig(threads=1, warmup_batches=0))
    model.load()
    batch = np.stack([model.preprocess(b) for b in serving_images])
    logits, features = model.predict(batch, True)
    np.testing.assert_allclose(model.probabilities(logits), serving_expected, atol=1e-5)
    assert features.shape == (len(serving_images), 512, 2, 2)
    # The CAM head's identity holds on the exported outputs.
    pooled = features.mean(axis=(2, 3)) @ artifact.cam.weight.T + artifact.cam.bias
    np.testing.assert_allclose(pooled, logits, atol=1e-3)


def test_torchscript_export_from_the_command_line(serving_checkpoint, serving_images, tmp_path):
    from kaedama.cli import main

    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"temperature": 2.5}))
    out = tmp_path / "ts model"
    code = main(
        [
            "export",
            str(serving_checkpoint),
            "--out",
            str(out),
            "--format",
            "torchscript",
            "--calibration",
            str(calibration),
        ]
    )
    assert code == 0
    artifact = load_artifact(str(out))
    assert artifact.runtime == "torchscript" and artifact.model_file == "model.pt"
    assert (
        artifact.name == "ts-model" and artifact.version == artifact.meta["files"]["model.pt"][:12]
    )
    assert artifact.temperature == 2.5
    model = ImageClassifier(str(out), ServeConfig(threads=1, warmup_batches=1))
    model.load()
    logits, _ = model.predict(np.stack([model.preprocess(serving_images[0])]), False)
    probs = model.probabilities(logits)
    np.testing.assert_allclose(probs, softmax(logits / 2.5), atol=1e-6)


def test_bad_calibration_is_a_clear_error(serving_checkpoint, tmp_path):
    calibration = tmp_path / "eval.json"
    calibration.write_text(json.dumps({"accuracy": 0.9}))
    config = ExportConfig(calibration=str(calibration), onnx_exporter="legacy", verify=False)
    with pytest.raises(ExportError, match="temperature"):
        export_checkpoint(str(serving_checkpoint), str(tmp_path / "m"), config)


def test_altered_or_incomplete_artifacts_are_refused(serving_model, tmp_path):
    altered = tmp_path / "altered"
    shutil.copytree(serving_model, altered)
    (altered / "cam.npz").write_bytes(b"not the weights")
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(str(altered))
    (altered / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(str(altered))
    with pytest.raises(ArtifactError, match="kaedama export"):
        load_artifact(str(tmp_path / "nothing"))


def test_model_card_is_read_without_the_model_file(serving_model, tmp_path):
    """Workers that only decode or format (the Beam job's Load and Format) read the card,
    never the model bytes: a card alone answers, the full load still refuses."""
    card_only = tmp_path / "card"
    card_only.mkdir()
    shutil.copy(serving_model / "kaedama-model.json", card_only)
    card = read_card(str(card_only))
    full = load_artifact(str(serving_model))
    assert (card.classes, card.version, card.name) == (full.classes, full.version, full.name)
    assert card.preprocess == full.preprocess and card.temperature == full.temperature
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(str(card_only))
    meta = json.loads((serving_model / "kaedama-model.json").read_text())
    del meta["classes"]
    (card_only / "kaedama-model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="no classes"):
        read_card(str(card_only))


def test_cam_only_for_pool_and_linear_heads(one_torch_thread):
    import timm
    import torch

    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32).eval()
    assert cam_head(vit, torch.randn(1, 3, 32, 32)) is None  # token features, no CAM
    resnet = timm.create_model("resnet18", num_classes=3).eval()
    weight, bias = cam_head(resnet, torch.randn(2, 3, 64, 64))
    assert weight.shape == (3, 512) and bias.shape == (3,)


def test_model_without_cam_answers_explain_with_501(serving_checkpoint, serving_images, tmp_path):
    out = tmp_path / "nocam"
    config = ExportConfig(cam=False, onnx_exporter="legacy", name="nocam")
    export_checkpoint(str(serving_checkpoint), str(out), config)
    assert load_artifact(str(out)).cam is None
    with run_server(out, warmup_batches=1) as server:
        r = httpx.post(server.url + "/v1/models/nocam:explain", content=serving_images[0])
        assert r.status_code == 501 and "CAM" in r.json()["error"]
        assert httpx.post(server.url + "/predict", content=serving_images[0]).status_code == 200
