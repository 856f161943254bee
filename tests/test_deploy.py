"""``kaedama deploy``: rendering from the manifests, and the HTTP conversation with the
API server (a recording stand-in on loopback, tests/fake_kube.py) through the real
``kubernetes`` client: apply, not-ready-then-ready, smoke test, rollback on failure."""

from __future__ import annotations

import base64
import copy
import io

import pytest
import yaml

from kaedama import cli
from kaedama.config import ConfigError
from kaedama.deploy.config import DeployConfig
from kaedama.deploy.kube import Kube, api_client
from kaedama.deploy.render import INSTANCE_LABEL, MODEL_URI_ANNOTATION, render, serving_container
from kaedama.deploy.rollout import (
    FAILED,
    PROGRESSING,
    READY,
    deployment_state,
    inference_service_state,
)
from kaedama.deploy.run import PROXY, DeployFailed, deploy, smoke_target
from kaedama.errors import KaedamaError
from tests.fake_kube import TOKEN, FakeApiServer, ready_model
from tests.k8s import REPO, container_problems, kustomize, validate_crd

OLD, NEW = "gs://models/flowers/v1/export", "gs://models/flowers/v2/export"
NS = "vision"
DEPLOYMENT = f"/apis/apps/v1/namespaces/{NS}/deployments/kaedama"
SERVICE = f"/api/v1/namespaces/{NS}/services/kaedama"
HPA = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/kaedama"
ISVC = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices/kaedama"


@pytest.fixture(autouse=True)
def _outside_the_cluster(monkeypatch):
    # CI may itself run in a pod; these tests play a deploy from a workstation.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def _fast(**kw) -> DeployConfig:
    return DeployConfig(namespace=NS, poll_interval=0.01, timeout=5, **kw)


def _model_uri(obj) -> str:
    return serving_container(obj)["args"][0]


def _strip(node):
    """Drop what render adds per model, to compare with the kustomize build."""
    if isinstance(node, dict):
        return {
            k: _strip(v)
            for k, v in node.items()
            if k not in (INSTANCE_LABEL, MODEL_URI_ANNOTATION, "namespace")
            and not (k == "labels" and v == {INSTANCE_LABEL: "kaedama"})
            and not (k == "annotations" and v == {MODEL_URI_ANNOTATION: OLD})
            and k != "app.kubernetes.io/managed-by"
        }
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


@pytest.mark.parametrize("mode", ["kserve", "raw"])
def test_render_is_the_kustomize_base_with_the_model_filled_in(mode):
    built = kustomize(REPO / "manifests" / "base" / "serving" / mode)
    for obj in built:
        if obj["kind"] in ("Deployment", "InferenceService"):
            serving_container(obj)["args"][0] = OLD
    rendered = render(OLD, DeployConfig(mode=mode, namespace=NS))
    # kustomize orders by kind (Services first); deploy keeps the kustomization's order.
    rendered.sort(key=lambda o: o["kind"])
    built.sort(key=lambda o: o["kind"])
    assert [o["kind"] for o in rendered] == [o["kind"] for o in built]
    for mine, theirs in zip(rendered, built, strict=True):
        assert mine["metadata"]["namespace"] == NS
        assert _strip(mine) == _strip(theirs), mine["kind"]


@pytest.mark.parametrize("mode", ["kserve", "raw"])
def test_rendered_objects_validate_and_stay_hardened(mode):
    import kubernetes_validate

    config = DeployConfig(
        mode=mode, namespace=NS, name="flowers", image="reg.example/kaedama-serve:v2",
        min_replicas=4, max_replicas=12, max_queue=96, max_batch_size=24, cpu="3",
        memory="3Gi", **({"scale_target": 40} if mode == "kserve" else {}),
    )  # fmt: skip
    objects = render(NEW, config)
    for obj in objects:
        assert obj["metadata"]["name"] == "flowers"
        if obj["kind"] == "InferenceService":
            validate_crd(obj, "serving.kserve.io_inferenceservices.yaml", strict=True)
            predictor = obj["spec"]["predictor"]
            assert predictor["containerConcurrency"] == 96 and predictor["scaleTarget"] == 40
            assert (predictor["minReplicas"], predictor["maxReplicas"]) == (4, 12)
        else:
            kubernetes_validate.validate(obj, "1.32", strict=True)
        assert container_problems(obj) == []
        if obj["kind"] in ("Deployment", "InferenceService"):
            container = serving_container(obj)
            args = container["args"]
            assert args[0] == NEW and container["image"] == config.image
            assert args[args.index("--max-queue") + 1] == "96"
            assert args[args.index("--max-batch-size") + 1] == "24"
            assert container["resources"]["requests"] == {"cpu": "3", "memory": "3Gi"}
            assert container["resources"]["limits"]["cpu"] == "3"
        if obj["kind"] == "HorizontalPodAutoscaler":
            assert obj["spec"]["scaleTargetRef"]["name"] == "flowers"
            assert (obj["spec"]["minReplicas"], obj["spec"]["maxReplicas"]) == (4, 12)
        if obj["kind"] == "Service":
            assert obj["spec"]["selector"][INSTANCE_LABEL] == "flowers"


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "Flowers_v2"},
        {"namespace": "a" * 64},
        {"min_replicas": 5, "max_replicas": 2},
        {"mode": "raw", "scale_target": 10},
        {"cpu": "two"},
        {"timeout": 0},
        {"max_queue": 0},
        {"model_name": "a/b"},
    ],
)
def test_bad_config_is_refused_with_the_field_named(fields):
    with pytest.raises(ConfigError, match=next(iter(fields)).split("_")[0]):
        DeployConfig(**fields)


def test_min_replicas_above_the_templates_max_says_what_to_pass():
    with pytest.raises(KaedamaError, match="--max-replicas"):
        render(NEW, DeployConfig(min_replicas=50))


def test_deployment_rollout_rules():
    base = {"metadata": {"generation": 2}, "spec": {"replicas": 2}}
    status = {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
    assert deployment_state({**base, "status": status})[0] == READY
    assert deployment_state({**base, "status": {**status, "observedGeneration": 1}})[0] == (
        PROGRESSING
    )
    assert deployment_state({**base, "status": {**status, "replicas": 3}})[0] == PROGRESSING
    assert deployment_state({**base, "status": {**status, "availableReplicas": 1}})[0] == (
        PROGRESSING
    )
    stuck = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
    assert deployment_state({**base, "status": {**status, "conditions": [stuck]}})[0] == FAILED


def test_inference_service_without_observed_generation_waits_for_a_new_revision():
    def isvc(generation, created, ready, ready_status="True"):
        return {
            "metadata": {"generation": generation},
            "status": {
                "components": {
                    "predictor": {"latestCreatedRevision": created, "latestReadyRevision": ready}
                },
                "conditions": [{"type": "Ready", "status": ready_status}],
            },
        }

    before = isvc(3, "p-00003", "p-00003")
    # Right after the apply: still the old revision's Ready, which must not count.
    assert inference_service_state(isvc(4, "p-00003", "p-00003"), before)[0] == PROGRESSING
    assert inference_service_state(isvc(4, "p-00004", "p-00003"), before)[0] == PROGRESSING
    assert inference_service_state(isvc(4, "p-00004", "p-00004"), before)[0] == READY
    # Re-applying the same spec creates no revision: Ready is enough.
    assert inference_service_state(isvc(3, "p-00003", "p-00003"), before)[0] == READY
    failed = isvc(4, "p-00004", "p-00003", "False")
    failed["status"]["conditions"][0]["reason"] = "RevisionFailed"
    assert inference_service_state(failed, before)[0] == FAILED


def test_smoke_test_target_follows_where_deploy_runs():
    raw = _fast(mode="raw")
    (deployment,) = [o for o in render(NEW, raw) if o["kind"] == "Deployment"]
    # From a laptop only the API server is reachable; in a pod, the Service itself.
    assert smoke_target(deployment, raw, in_cluster=False) == PROXY
    assert smoke_target(deployment, raw, in_cluster=True) == (
        f"http://kaedama.{NS}.svc.cluster.local"
    )
    forwarded = _fast(mode="raw", smoke_url="http://127.0.0.1:8080")
    assert smoke_target(deployment, forwarded, in_cluster=False) == "http://127.0.0.1:8080"
    isvc = render(NEW, _fast())[0]
    isvc["status"] = {"url": "https://kaedama.example.com", "address": {"url": "http://a.svc"}}
    assert smoke_target(isvc, _fast(), in_cluster=False) == "http://a.svc"
    del isvc["status"]
    with pytest.raises(DeployFailed, match="--smoke-url"):
        smoke_target(isvc, _fast(), in_cluster=True)


def _deployment_status(ready_after: int, failing_uri: str = ""):
    """Status script: ready after ``ready_after`` reads; a rollout of ``failing_uri`` stalls."""

    def status(obj, reads):
        if obj["kind"] != "Deployment":
            return {}
        generation = obj["metadata"]["generation"]
        if _model_uri(obj) == failing_uri:
            if reads < 2:
                return {"observedGeneration": generation, "replicas": 3, "updatedReplicas": 1}
            stuck = {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "kaedama-7d" has timed out progressing.',
            }
            return {"observedGeneration": generation, "replicas": 3, "conditions": [stuck]}
        updated = 1 if reads < ready_after else 2
        return {
            "observedGeneration": generation,
            "replicas": 2,
            "updatedReplicas": updated,
            "availableReplicas": updated,
        }

    return status


def test_raw_deploy_applies_waits_until_ready_smoke_tests_and_reports(tmp_path, capsys):
    with FakeApiServer(status=_deployment_status(ready_after=4)) as api:
        rc = cli.main([
            "deploy", NEW, "--mode", "raw", "--namespace", NS,
            "--kubeconfig", str(api.kubeconfig(tmp_path)), "--poll-interval", "0.01",
        ])  # fmt: skip
        requests = list(api.requests)
        stored = copy.deepcopy(api.objects)
    assert rc == 0
    out = capsys.readouterr().out
    assert f"url: http://kaedama.{NS}.svc.cluster.local" in out and "created" in out
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in requests)
    applies = [r for r in requests if r.method == "PATCH"]
    assert [r.body["kind"] for r in applies] == [
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
    ]  # fmt: skip
    for r in applies:
        assert r.headers["content-type"] == "application/apply-patch+yaml"
        assert r.query == {"fieldManager": "kaedama-deploy", "force": "true"}
    assert _model_uri(stored[DEPLOYMENT]) == NEW
    # Not ready, not ready, not ready, ready: the smoke test starts only after the 4th read.
    index = {id(r): i for i, r in enumerate(requests)}
    reads = [r for r in requests if r.method == "GET" and r.path == DEPLOYMENT]
    assert len(reads) == 1 + 4  # the snapshot before applying, then four polls
    proxied = [r for r in requests if "/proxy/" in r.path]
    assert index[id(proxied[0])] > index[id(reads[-1])]
    prefix = f"/api/v1/namespaces/{NS}/services/kaedama:http/proxy"
    assert [(r.method, r.path) for r in proxied] == [
        ("GET", f"{prefix}/v2/health/ready"),
        ("GET", f"{prefix}/v2/models/kaedama/ready"),
        ("POST", f"{prefix}/v2/models/kaedama/infer"),
    ]
    (tensor,) = proxied[-1].body["inputs"]
    assert tensor["datatype"] == "BYTES" and tensor["shape"] == [1]
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(tensor["data"][0]))).size == (64, 48)


def _previous_raw(api: FakeApiServer) -> dict:
    old = {o["kind"]: o for o in render(OLD, _fast(mode="raw"))}
    api.put(DEPLOYMENT, {**old["Deployment"], "spec": {**old["Deployment"]["spec"], "replicas": 3}})
    api.put(SERVICE, old["Service"])
    return old


def test_a_stalled_rollout_is_rolled_back_and_the_previous_version_keeps_serving(tmp_path):
    with FakeApiServer(status=_deployment_status(ready_after=1, failing_uri=NEW)) as api:
        _previous_raw(api)
        kube = Kube(api_client(str(api.kubeconfig(tmp_path))))
        with pytest.raises(DeployFailed, match="rolled back.*previous version keeps serving") as e:
            deploy(NEW, _fast(mode="raw"), kube=kube)
        stored = copy.deepcopy(api.objects)
        puts, deletes = api.calls("PUT"), api.calls("DELETE")
        proxied = api.calls("GET", "/proxy/")
    assert "ProgressDeadlineExceeded" in str(e.value) or "timed out" in str(e.value)
    # The Deployment's template is back to the old model (a rollback, not a new rollout of v2).
    assert _model_uri(stored[DEPLOYMENT]) == OLD
    assert stored[DEPLOYMENT]["spec"]["replicas"] == 3
    assert sorted(r.path for r in puts) == sorted([DEPLOYMENT, SERVICE])
    # What did not exist before is removed again; nothing was smoke-tested.
    assert HPA not in stored and len(deletes) == 3 and not proxied
    assert set(stored) == {DEPLOYMENT, SERVICE}


def test_a_failed_rollback_says_so_and_what_to_inspect(tmp_path):
    with FakeApiServer(status=_deployment_status(ready_after=1, failing_uri=NEW)) as api:
        _previous_raw(api)
        api.refuse[("PUT", DEPLOYMENT)] = 403
        kube = Kube(api_client(str(api.kubeconfig(tmp_path))))
        with pytest.raises(DeployFailed, match="so did the rollback.*HTTP 403.*rollout undo"):
            deploy(NEW, _fast(mode="raw"), kube=kube)


def test_without_rollback_the_failed_version_stays_for_inspection(tmp_path):
    with FakeApiServer(status=_deployment_status(ready_after=1, failing_uri=NEW)) as api:
        _previous_raw(api)
        kube = Kube(api_client(str(api.kubeconfig(tmp_path))))
        with pytest.raises(DeployFailed, match="ProgressDeadlineExceeded|timed out"):
            deploy(NEW, _fast(mode="raw", rollback=False), kube=kube)
        assert _model_uri(api.objects[DEPLOYMENT]) == NEW
        assert not api.calls("PUT") and not api.calls("DELETE")


def _isvc_status(api: FakeApiServer, ready_after: int):
    def status(obj, reads):
        generation = obj["metadata"]["generation"]
        created, ready = (
            f"kaedama-predictor-{generation:05d}",
            f"kaedama-predictor-{generation:05d}",
        )
        if reads < ready_after:
            ready = f"kaedama-predictor-{generation - 1:05d}"
        return {
            "observedGeneration": generation,
            "url": f"http://kaedama.{NS}.example.com",
            "address": {"url": f"{api.url}/direct"},
            "components": {
                "predictor": {"latestCreatedRevision": created, "latestReadyRevision": ready}
            },
            "conditions": [{"type": "Ready", "status": "True"}],
        }

    return status


def test_kserve_smoke_failure_rolls_back_to_the_previous_inference_service(tmp_path):
    def broken_model(method, path, body):
        if path.endswith("/infer"):
            return 500, "Internal Server Error"
        return ready_model(method, path, body)

    api = FakeApiServer(model=broken_model)
    api.status = _isvc_status(api, ready_after=3)
    with api:
        api.put(ISVC, render(OLD, _fast())[0])
        kube = Kube(api_client(str(api.kubeconfig(tmp_path))))
        with pytest.raises(DeployFailed, match="infer answered 500"):
            deploy(NEW, _fast(), kube=kube, smoke_tries=2)
        stored = copy.deepcopy(api.objects)
        direct = [r.path for r in api.requests if r.path.startswith("/direct/")]
        reads = api.calls("GET", ISVC)
    assert _model_uri(stored[ISVC]) == OLD
    assert direct[:2] == ["/direct/v2/health/ready", "/direct/v2/models/kaedama/ready"]
    # 500 is not "not yet": no retry of the inference.
    assert direct[2:] == ["/direct/v2/models/kaedama/infer"]
    # Revision not ready for two polls, then ready: 1 snapshot + 3 polls (+ the replace's read).
    assert len(reads) >= 4


def test_a_first_deploy_that_never_gets_ready_is_removed_after_the_timeout(tmp_path):
    def never_ready(obj, reads):
        return {"observedGeneration": obj["metadata"]["generation"],
                "conditions": [{"type": "Ready", "status": "False", "reason": "Waiting",
                                "message": "0 of 2 pods ready"}]}  # fmt: skip

    with FakeApiServer(status=never_ready) as api:
        kube = Kube(api_client(str(api.kubeconfig(tmp_path))))
        config = DeployConfig(namespace=NS, timeout=0.3, poll_interval=0.05)
        with pytest.raises(DeployFailed, match=r"not ready after 0.3 s: 0 of 2 pods ready"):
            deploy(NEW, config, kube=kube)
        assert api.objects == {}
        assert [r.path for r in api.calls("DELETE")] == [ISVC]


def test_an_api_error_is_reported_with_the_servers_message(tmp_path):
    with FakeApiServer() as api:
        path = api.kubeconfig(tmp_path)
        text = path.read_text().replace(TOKEN, "wrong-token")
        path.write_text(text)
        with pytest.raises(KaedamaError, match="HTTP 401: Unauthorized"):
            deploy(NEW, _fast(), kube=Kube(api_client(str(path))))


def test_dry_run_prints_the_objects_without_a_cluster(capsys, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    assert cli.main(["deploy", NEW, "--mode", "raw", "--name", "flowers", "--dry-run"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {d["kind"] for d in docs} == {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
    }  # fmt: skip
    assert all(d["metadata"]["name"] == "flowers" for d in docs)


def test_missing_cluster_configuration_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["deploy", NEW]) == 1
    assert "no Kubernetes configuration" in capsys.readouterr().err
