"""The serving InferenceService: kustomize builds, valid against KServe's CRD, and its
container runs a valid ``kaedama serve`` command line with probes the server answers."""

from __future__ import annotations

import argparse

from kaedama.config import config_from_args
from kaedama.serve.config import ServeConfig
from tests.k8s import REPO, kustomize, validate_crd

TARGET = REPO / "manifests" / "base" / "serve"
ISVC_CRD = "serving.kserve.io_inferenceservices.yaml"


def _isvc() -> dict:
    docs = kustomize(TARGET)
    services = [d for d in docs if d["kind"] == "InferenceService"]
    assert len(services) == 1
    return services[0]


def test_inferenceservice_builds_and_validates():
    validate_crd(_isvc(), ISVC_CRD)


def test_container_runs_a_valid_serve_command_with_a_warm_minimum():
    from kaedama.commands import serve as command
    from kaedama.serve.app import create_app

    predictor = _isvc()["spec"]["predictor"]
    assert predictor["minReplicas"] >= 2  # bursts need warm replicas
    (container,) = predictor["containers"]
    parser = argparse.ArgumentParser()
    command.configure(parser)
    args = parser.parse_args(container["args"])
    config = config_from_args(ServeConfig, args)
    assert args.model_dir == "/mnt/models"
    assert predictor["terminationGracePeriodSeconds"] > config.drain_timeout_s
    app = create_app(args.model_dir, config)
    paths = {route.path for route in app.routes}
    assert container["readinessProbe"]["httpGet"]["path"] in paths
    assert container["livenessProbe"]["httpGet"]["path"] in paths
    assert container["ports"][0]["containerPort"] == ServeConfig().port
