"""The Kubeflow pipeline: golden compile, parameters, and the TrainJob launcher over HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from kaedama import cli
from kaedama.commands.pipeline import parse_params
from kaedama.errors import KaedamaError
from kaedama.train.launch import LaunchError, TrainLaunch, launch_trainjob, render_trainjob
from tests.fake_kube import TOKEN, FakeApiServer
from tests.k8s import validate_crd

GOLDEN = Path(__file__).parent / "golden" / "kaedama_pipeline.yaml"
IMAGE = "registry.example.com/kaedama:golden"
TRAIN_IMAGE = "registry.example.com/kaedama-train:golden"


def _without_sdk_version(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("sdkVersion:"))


def test_compiled_pipeline_equals_the_golden_file(tmp_path):
    out = tmp_path / "pipeline.yaml"
    args = ["--out", str(out), "--image", IMAGE, "--train-image", TRAIN_IMAGE]
    assert cli.main(["pipeline", "compile", *args]) == 0
    if os.environ.get("KAEDAMA_UPDATE_GOLDEN"):
        GOLDEN.write_text(out.read_text())
    # Compare everything but the SDK's version line: a change in any step shows here.
    assert _without_sdk_version(out.read_text()) == _without_sdk_version(GOLDEN.read_text()), (
        "the compiled pipeline changed; if intended, rerun with KAEDAMA_UPDATE_GOLDEN=1"
    )


def test_compiled_pipeline_runs_every_step_in_the_image_and_gates_deploy():
    spec = yaml.safe_load(GOLDEN.read_text())
    executors = spec["deploymentSpec"]["executors"]
    image_of = {
        name.removeprefix("exec-"): e["container"]["image"] for name, e in executors.items()
    }
    assert image_of == {
        "dedup": IMAGE,
        "split": IMAGE,
        "deploy": IMAGE,
        "train": TRAIN_IMAGE,
        "evaluate": TRAIN_IMAGE,
        "export": TRAIN_IMAGE,
    }
    # Nothing is pip-installed when a task starts: the image holds kaedama and kfp.
    for e in executors.values():
        assert "pip install" not in " ".join(e["container"].get("command", []))
    tasks = spec["root"]["dag"]["tasks"]
    assert {"dedup", "split", "train", "evaluate", "export"} <= set(tasks)
    gate = json.dumps(spec["root"]["dag"]["tasks"])
    assert "promote" in gate and "deploy_mode" in gate


def test_params_are_typed_from_the_pipeline_signature():
    params = parse_params(
        ["data_uri=gs://b/p", "epochs=3", "pretrained=false", 'train_options=["lr=0.1"]']
    )
    assert params == {
        "data_uri": "gs://b/p",
        "epochs": 3,
        "pretrained": False,
        "train_options": ["lr=0.1"],
    }
    with pytest.raises(KaedamaError, match="epochs"):
        parse_params(["data_uri=x", "epochs=many"])
    with pytest.raises(KaedamaError, match="NAME one of"):
        parse_params(["data_uri=x", "epoch=3"])
    with pytest.raises(KaedamaError, match="missing required pipeline parameter"):
        parse_params([])


# --------------------------------------------------------------------------- TrainJob launcher


def test_rendered_trainjob_matches_the_crd_and_the_kustomize_base():
    job = TrainLaunch(
        manifest="gs://b/split/manifest.jsonl",
        out="gs://b/runs/v1",
        args=("--model", "resnet50", "--epochs", "5"),
        image=IMAGE,
        nodes=3,
        gpus_per_node=4,
        namespace="ml",
    )
    body = render_trainjob(job)
    validate_crd(body, "trainer.kubeflow.org_trainjobs.yaml")
    base = yaml.safe_load(
        (Path(__file__).parents[1] / "manifests/base/train/trainjob.yaml").read_text()
    )
    assert body["spec"]["runtimeRef"] == base["spec"]["runtimeRef"]
    trainer = body["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "--nproc_per_node=4", "-m", "kaedama.train"]
    assert trainer["args"][:4] == [
        "gs://b/split/manifest.jsonl",
        "--out",
        "gs://b/runs/v1",
        "--resume",
    ]
    assert trainer["numNodes"] == 3
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    with pytest.raises(LaunchError, match="gs://"):
        TrainLaunch(manifest="./split/manifest.jsonl", out="gs://b/o")


def _trainjob_status(outcome: str):
    """Running for two reads, then ``outcome`` (Complete or Failed)."""

    def status(obj, reads):
        if reads < 3:
            return {}
        return {"conditions": [{"type": outcome, "status": "True", "message": "OOMKilled"}]}

    return status


@pytest.mark.parametrize("outcome", ["Complete", "Failed"])
def test_launcher_creates_watches_and_returns_the_result(gcs_bucket, outcome):
    from kubernetes import client

    from kaedama import storage

    out = f"{gcs_bucket}/runs/launch-{outcome.lower()}"
    storage.write_text(f"{out}/history.json", json.dumps([{"epoch": 1, "val_acc": 0.5}]))
    storage.write_text(f"{out}/result.json", json.dumps({"best_val_acc": 0.75}))
    job = TrainLaunch(
        manifest=f"{gcs_bucket}/split/manifest.jsonl", out=out, namespace="ml", name="t1", poll_s=0
    )
    seen = []
    with FakeApiServer(status=_trainjob_status(outcome)) as api:
        config = client.Configuration()
        config.host = api.url
        config.api_key = {"authorization": f"Bearer {TOKEN}"}
        run = lambda: launch_trainjob(  # noqa: E731
            job,
            on_status=lambda k, v: seen.append((k, v)),
            client_config=config,
            sleep=lambda s: None,
        )
        if outcome == "Complete":
            assert run() == {"best_val_acc": 0.75}
        else:
            with pytest.raises(LaunchError, match="OOMKilled"):
                run()
        requests = list(api.requests)
    created = requests[0]
    assert (created.method, created.path) == (
        "POST",
        "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs",
    )
    assert created.body["metadata"]["name"] == "t1"
    gets = [r.path for r in requests if r.method == "GET"]
    assert gets == ["/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs/t1"] * 3
    assert ("epochs_done", 1.0) in seen and ("val_acc", 0.5) in seen
