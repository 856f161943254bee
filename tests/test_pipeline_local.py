"""The whole Kubeflow pipeline run locally (kfp.local, every step a subprocess): both
branches of the champion/challenger gate, the deploy step talking to a stand-in
Kubernetes API server on loopback (tests/fake_kube.py) through KUBECONFIG.

What differs from a cluster: steps run in this machine's Python, not in the images;
GPU, CPU and memory requests are ignored; artifacts are local folders, not gs://.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fake_kube import FakeApiServer
from tests.test_deploy import _deployment_status

pytestmark = pytest.mark.slow


def _run(data: Path, root: Path, **params) -> dict[str, Path]:
    from kfp import local

    from pipelines.kaedama_pipeline import build_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    task = build_pipeline()(
        data_uri=str(data),
        model_name="test_resnet",
        pretrained=False,
        img_size=32,
        epochs=1,
        train_options=["batch_size=8", "workers=0", "lr=0.05"],
        deploy_mode="raw",
        namespace="vision",
        **params,
    )
    return {name: Path(a.path) for name, a in task.outputs.items()}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from dataclasses import replace

    from kaedama.fixtures import FixturesConfig, make_digits_folder

    root = tmp_path_factory.mktemp("pipeline") / "data"
    config = replace(FixturesConfig(), per_class=20, classes=("3", "8")).clean()
    make_digits_folder(root, config, progress=False)
    return root


def test_the_gate_deploys_a_model_that_passes_and_skips_one_that_does_not(
    digits, tmp_path, monkeypatch
):
    with FakeApiServer(status=_deployment_status(ready_after=1)) as api:
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path)))
        # No champion and an unreachable minimum: everything up to export, no deploy.
        held = _run(digits, tmp_path / "held", min_accuracy=1.01)
        assert not api.requests, "the gate let a model below the minimum through"
        # The same run with a minimum it meets: deploy creates the serving objects.
        passed = _run(digits, tmp_path / "passed", min_accuracy=0.0)
        applied = [r for r in api.requests if r.method == "PATCH"]
    for outputs in (held, passed):
        summary = json.loads((outputs["cleaned"] / "summary.json").read_text())
        assert summary["kept"] + summary["dropped"] + summary["rejected"] == summary["input"]
        assert (outputs["model"] / "best.pt").is_file()
        assert (outputs["evaluation"] / "report.html").is_file()
        assert (outputs["exported"] / "kaedama-model.json").is_file()
    kinds = {r.body["kind"] for r in applied}
    assert {"Deployment", "Service"} <= kinds
    deployment = next(r.body for r in applied if r.body["kind"] == "Deployment")
    assert str(passed["exported"]) in json.dumps(deployment)
