"""Serving, access and overlay manifests: kustomize builds, schemas, hardening, consistency."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from tests.k8s import REPO, container_problems, kustomize, pod_specs, validate_crd

MANIFESTS = REPO / "manifests"
ISVC_CRD = "serving.kserve.io_inferenceservices.yaml"
TRAINJOB_CRD = "trainer.kubeflow.org_trainjobs.yaml"
CRDS = {"InferenceService": ISVC_CRD, "TrainJob": TRAINJOB_CRD}
TARGETS = [
    "base/serving/kserve",
    "base/serving/raw",
    "base/access",
    "base/train",
    "overlays/gpu-4",
    "overlays/dev",
    "overlays/prod",
    "overlays/prod-raw",
]
OVERLAYS = ["overlays/dev", "overlays/prod", "overlays/prod-raw"]
K8S_VERSION = "1.32"


def _build(target: str) -> list[dict]:
    return kustomize(MANIFESTS / target)


def _by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _serve_container(doc: dict) -> dict:
    (pod,) = pod_specs(doc)
    (container,) = pod["containers"]
    return container


def _arg(container: dict, flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def test_every_kustomization_is_a_target():
    found = {str(p.parent.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("kustomization.yaml")}
    assert found == set(TARGETS)


@pytest.mark.parametrize("target", TARGETS)
def test_core_objects_validate_strictly(target):
    import kubernetes_validate

    docs = _build(target)
    assert docs
    core = [d for d in docs if d["kind"] not in CRDS]
    for doc in core:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}") from exc


@pytest.mark.parametrize("target", TARGETS)
def test_custom_resources_validate_against_their_crds(target):
    docs = [d for d in _build(target) if d["kind"] in CRDS]
    for doc in docs:
        validate_crd(doc, CRDS[doc["kind"]], strict=True)


def test_strict_crd_check_catches_a_misspelt_field():
    (isvc,) = _build("base/serving/kserve")
    validate_crd(isvc, ISVC_CRD, strict=True)
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["minReplica"] = 2
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(bad, ISVC_CRD, strict=True)
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["scaleMetric"] = "queue"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(bad, ISVC_CRD)


def test_strict_core_check_catches_a_misspelt_field():
    import kubernetes_validate

    deployment = _by_kind(_build("base/serving/raw"), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_is_hardened_and_sized(target):
    docs = _build(target)
    problems = [p for d in docs for p in container_problems(d)]
    assert not problems, "\n".join(problems)


def test_hardening_check_finds_a_weakened_container():
    (isvc,) = _build("base/serving/kserve")
    assert container_problems(isvc) == []
    sc = _serve_container(isvc)["securityContext"]
    sc["readOnlyRootFilesystem"] = False
    sc["capabilities"] = {"drop": ["NET_RAW"]}
    del _serve_container(isvc)["resources"]["limits"]
    problems = container_problems(isvc)
    assert len(problems) == 3, problems


@pytest.mark.parametrize("target", TARGETS)
def test_no_credentials_in_any_manifest(target):
    for doc in _build(target):
        assert doc["kind"] != "Secret"
        for pod in pod_specs(doc):
            for c in pod.get("containers", []):
                for env in c.get("env", []):
                    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env["name"]
                    assert "valueFrom" in env or "KEY" not in env["name"].upper()


def test_inference_service_scales_on_concurrency_matched_to_the_server_queue():
    (isvc,) = _build("base/serving/kserve")
    predictor = isvc["spec"]["predictor"]
    container = _serve_container(isvc)
    max_queue = int(_arg(container, "--max-queue"))
    max_batch = int(_arg(container, "--max-batch-size"))
    assert predictor["scaleMetric"] == "concurrency"
    # Concurrency scaling needs Knative's autoscaler; KServe's default mode (Standard) has none.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    # Knative's default feature flags refuse these pod-level fields: the hardening must
    # live on the container.
    assert not {"securityContext", "terminationGracePeriodSeconds"} & set(predictor)
    # The hard limit admits exactly what the server's queue holds (no 429 under KPA),
    # and the soft target leaves headroom for a burst before the next pod is ready.
    assert predictor["containerConcurrency"] == max_queue
    assert max_batch <= predictor["scaleTarget"] < predictor["containerConcurrency"]
    assert 2 <= predictor["minReplicas"] < predictor["maxReplicas"]
    assert predictor["serviceAccountName"] == "kaedama-serve"
    assert container["args"][0].startswith("gs://")
    assert _arg(container, "--port") == str(container["ports"][0]["containerPort"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_raw_objects_agree_with_each_other():
    docs = _build("base/serving/raw")
    (deployment,) = _by_kind(docs, "Deployment")
    (service,) = _by_kind(docs, "Service")
    (hpa,) = _by_kind(docs, "HorizontalPodAutoscaler")
    (pdb,) = _by_kind(docs, "PodDisruptionBudget")
    (policy,) = _by_kind(docs, "NetworkPolicy")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return selector.items() <= pod_labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(service["spec"]["selector"])
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # The HPA owns the replica count; a replicas field would fight it on every apply.
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["minReplicas"] >= 2 and "maxUnavailable" in pdb["spec"]
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60
    # Old pods keep serving until new ones are ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    container = _serve_container(deployment)
    port = container["ports"][0]
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {port["containerPort"]}
    assert {"Ingress", "Egress"} == set(policy["spec"]["policyTypes"])


def test_kserve_and_raw_run_the_same_server():
    (isvc,) = _build("base/serving/kserve")
    deployment = _by_kind(_build("base/serving/raw"), "Deployment")[0]
    a, b = _serve_container(isvc), _serve_container(deployment)
    for key in ("image", "args", "resources", "securityContext", "env"):
        assert a[key] == b[key], key
    assert a["readinessProbe"]["httpGet"]["path"] == b["readinessProbe"]["httpGet"]["path"]


@pytest.mark.parametrize("target", OVERLAYS)
def test_overlays_rewrite_every_image_and_namespace(target):
    docs = _build(target)
    (namespace,) = _by_kind(docs, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] in ("baseline", "restricted")
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    name = namespace["metadata"]["name"]
    images = []
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == name, doc["kind"]
        if doc["kind"] == "TrainJob":
            images.append(doc["spec"]["trainer"]["image"])
        for pod in pod_specs(doc):
            images.extend(c["image"] for c in pod.get("containers", []) if "image" in c)
    assert len(images) == 2
    # kustomize's `images:` reaches into the InferenceService and TrainJob (configurations).
    for image in images:
        assert image.startswith("europe-docker.pkg.dev/") and not image.endswith(":latest")
    for binding in _by_kind(docs, "RoleBinding"):
        assert all(s["namespace"] == name for s in binding["subjects"])


@pytest.mark.parametrize("target", OVERLAYS)
def test_storage_access_goes_through_workload_identity(target):
    docs = _build(target)
    accounts = {d["metadata"]["name"]: d for d in _by_kind(docs, "ServiceAccount")}
    used = set()
    for doc in docs:
        for pod in pod_specs(doc):
            used.add(pod.get("serviceAccountName"))
    assert used <= set(accounts) and len(used) == 2
    for name in used:
        annotation = accounts[name]["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        assert annotation.endswith(".iam.gserviceaccount.com") and "PROJECT" not in annotation


def _rules(docs: list[dict], role: str) -> dict[tuple[str, str], set[str]]:
    (doc,) = [d for d in _by_kind(docs, "Role") if d["metadata"]["name"] == role]
    out = {}
    for rule in doc["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out[(group, resource)] = set(rule["verbs"])
    return out


def test_rbac_is_namespaced_and_least_privilege():
    docs = _build("base/access")
    assert not _by_kind(docs, "ClusterRole") and not _by_kind(docs, "ClusterRoleBinding")
    for role in _by_kind(docs, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
    for binding in _by_kind(docs, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert [s["name"] for s in binding["subjects"]] == [binding["roleRef"]["name"]]
    plural = {
        "InferenceService": "inferenceservices",
        "Deployment": "deployments",
        "Service": "services",
        "HorizontalPodAutoscaler": "horizontalpodautoscalers",
        "PodDisruptionBudget": "poddisruptionbudgets",
        "NetworkPolicy": "networkpolicies",
    }
    applied = set()
    for target in ("base/serving/kserve", "base/serving/raw"):
        for doc in _build(target):
            group = doc["apiVersion"].rpartition("/")[0]
            applied.add((group, plural[doc["kind"]]))
    deploy = _rules(docs, "kaedama-deploy")
    # Exactly the kinds `kaedama deploy` applies, plus the proxy for its smoke test.
    assert set(deploy) == applied | {("", "services/proxy")}
    for key in applied:
        assert deploy[key] == {"get", "create", "patch", "update", "delete"}, key
    assert deploy[("", "services/proxy")] == {"get", "create"}
    launcher = _rules(docs, "kaedama-launcher")
    assert set(launcher) == {
        ("trainer.kubeflow.org", "trainjobs"),
        ("", "pods"),
        ("", "pods/log"),
    }
    assert "delete" not in launcher[("", "pods")] and launcher[("", "pods/log")] == {"get"}
