"""Opt-in: the manifests and `kaedama deploy` against a real cluster (set KUBECONFIG).

No Kubernetes API server exists on the project's machines, so this skips there.
Against a cluster:
- the TrainJob (Kubeflow Trainer installed) and every serving object `kaedama deploy`
  renders are accepted by a server-side dry run (InferenceService only where KServe's
  CRD is installed);
- with KAEDAMA_TEST_MODEL_URI (an exported model the cluster can read) and
  KAEDAMA_TEST_SERVE_IMAGE (a pushed kaedama-serve image), a real raw-mode deploy
  becomes ready, passes its smoke test and is deleted again.
Namespace: KAEDAMA_TEST_NAMESPACE (default "default").
"""

from __future__ import annotations

import os

import pytest

from tests.k8s import REPO, kustomize

pytestmark = pytest.mark.cluster
NAMESPACE = os.environ.get("KAEDAMA_TEST_NAMESPACE", "default")


@pytest.fixture(scope="module")
def api_client():
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("set KUBECONFIG to run the real-cluster checks (opt-in)")
    from kubernetes import config

    return config.new_client_from_config()


@pytest.fixture(scope="module")
def custom_objects(api_client):
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


@pytest.mark.parametrize("target", ["base/train", "overlays/gpu-4"])
def test_trainjob_is_accepted_by_the_api_server(custom_objects, target):
    for doc in kustomize(REPO / "manifests" / target):
        group, version = doc["apiVersion"].split("/")
        created = custom_objects.create_namespaced_custom_object(
            group, version, NAMESPACE, "trainjobs", doc, dry_run="All"
        )
        assert created["spec"]["runtimeRef"]["name"] == doc["spec"]["runtimeRef"]["name"]


@pytest.mark.parametrize("mode", ["raw", "kserve"])
def test_rendered_serving_objects_are_accepted_by_the_api_server(api_client, mode):
    from kaedama.deploy.config import DeployConfig
    from kaedama.deploy.kube import Kube, KubeError, Ref
    from kaedama.deploy.render import render

    kube = Kube(api_client)
    config = DeployConfig(mode=mode, namespace=NAMESPACE, name="kaedama-dry-run")
    for obj in render("gs://kaedama-test/model", config):
        try:
            answer = kube.apply(obj, dry_run=True)
        except KubeError as exc:
            if exc.status == 404 and obj["kind"] == "InferenceService":
                pytest.skip("KServe is not installed on this cluster")
            raise
        assert answer["kind"] == obj["kind"]
        # A dry run persists nothing.
        assert kube.get(Ref.of(obj)) is None


def test_a_real_deploy_becomes_ready_and_answers(api_client):
    model, image = (
        os.environ.get("KAEDAMA_TEST_MODEL_URI"),
        os.environ.get("KAEDAMA_TEST_SERVE_IMAGE"),
    )
    if not (model and image):
        pytest.skip("set KAEDAMA_TEST_MODEL_URI and KAEDAMA_TEST_SERVE_IMAGE for a real deploy")
    from kaedama.deploy.config import DeployConfig
    from kaedama.deploy.kube import Kube, Ref
    from kaedama.deploy.render import render
    from kaedama.deploy.run import deploy

    kube = Kube(api_client)
    config = DeployConfig(
        mode="raw", namespace=NAMESPACE, name="kaedama-e2e", image=image, timeout=600
    )
    try:
        result = deploy(model, config, kube=kube)
        assert result.url == f"http://kaedama-e2e.{NAMESPACE}.svc.cluster.local"
    finally:
        for obj in render(model, config):
            kube.delete(Ref.of(obj))
