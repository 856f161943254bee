"""Opt-in: server-side dry run of the manifests on a real cluster (set KUBECONFIG).

No Kubernetes API server exists on the project's machines, so this skips there;
against a cluster with Kubeflow Trainer installed it proves the API server accepts
what kustomize renders.
"""

from __future__ import annotations

import os

import pytest

from tests.k8s import REPO, kustomize

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def custom_objects():
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("set KUBECONFIG to run the real-cluster checks (opt-in)")
    from kubernetes import client, config

    config.load_kube_config()
    return client.CustomObjectsApi()


@pytest.mark.parametrize("target", ["base/train", "overlays/gpu-4"])
def test_trainjob_is_accepted_by_the_api_server(custom_objects, target):
    namespace = os.environ.get("KAEDAMA_TEST_NAMESPACE", "default")
    for doc in kustomize(REPO / "manifests" / target):
        group, version = doc["apiVersion"].split("/")
        created = custom_objects.create_namespaced_custom_object(
            group, version, namespace, "trainjobs", doc, dry_run="All"
        )
        assert created["spec"]["runtimeRef"]["name"] == doc["spec"]["runtimeRef"]["name"]
