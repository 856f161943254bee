"""A small resource client over the ``kubernetes`` API client.

The serving objects span six API groups, one of them a custom resource; the typed API
classes would need six clients and model conversions, and the dynamic client a round of
discovery requests. ``ApiClient.call_api`` keeps the kubernetes client's kubeconfig,
in-cluster and TLS handling and lets one code path get, apply (server-side apply),
replace and delete any of them, and reach a Service through the API server's proxy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as kubeconfig
from kubernetes.client.rest import ApiException

from kaedama.errors import KaedamaError

Obj = dict[str, Any]
FIELD_MANAGER = "kaedama-deploy"
# (apiVersion, kind) -> plural resource name, for the kinds deploy applies.
PLURALS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservices",
    ("apps/v1", "Deployment"): "deployments",
    ("v1", "Service"): "services",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
}
# Server-filled fields that a replace must not send back.
_SERVER_FIELDS = ("uid", "creationTimestamp", "managedFields", "generation", "selfLink")


def api_client(kubeconfig_file: str = "", context: str = "") -> k8s.ApiClient:
    """An API client from a kubeconfig (flag, $KUBECONFIG, ~/.kube/config) or in-cluster."""
    default = Path(os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0])
    try:
        if kubeconfig_file or default.expanduser().is_file() or context:
            return kubeconfig.new_client_from_config(
                config_file=kubeconfig_file or None, context=context or None
            )
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kubeconfig.load_incluster_config()
            return k8s.ApiClient()
    except (kubeconfig.ConfigException, OSError) as exc:
        raise KaedamaError(f"cannot load the Kubernetes configuration: {exc}") from exc
    raise KaedamaError(
        "no Kubernetes configuration: pass --kubeconfig, set KUBECONFIG, or run in a pod"
    )


@dataclass(frozen=True)
class Ref:
    """Where one object lives."""

    api_version: str
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, obj: Obj) -> Ref:
        meta = obj["metadata"]
        return cls(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])

    @property
    def path(self) -> str:
        plural = PLURALS.get((self.api_version, self.kind))
        if plural is None:
            raise KaedamaError(f"deploy does not manage {self.api_version} {self.kind}")
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        return f"{prefix}/namespaces/{self.namespace}/{plural}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} in namespace {self.namespace}"


class KubeError(KaedamaError):
    """The API server refused a request; the message carries its reason."""

    def __init__(self, what: str, exc: ApiException):
        body = _decode(exc.body)
        reason = (body.get("message") if isinstance(body, dict) else None) or exc.reason
        super().__init__(f"{what}: HTTP {exc.status}: {reason}")
        self.status = exc.status


class Kube:
    """get / apply / replace / delete for the serving kinds, and the service proxy."""

    def __init__(self, api: k8s.ApiClient):
        self.api = api

    def _call(self, method: str, path: str, *, body: Any = None, query=(), content_type=None):
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        response = self.api.call_api(
            path,
            method,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
        )
        data = response.data
        return json.loads(data) if data else None

    def get(self, ref: Ref) -> Obj | None:
        """The object, or None where it does not exist."""
        try:
            return self._call("GET", ref.path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeError(f"reading {ref}", exc) from exc

    def apply(self, obj: Obj, *, dry_run: bool = False) -> Obj:
        """Create or update with server-side apply (this manager owns what it sets).

        ``dry_run`` asks the API server to validate and admit without persisting.
        """
        ref = Ref.of(obj)
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        if dry_run:
            query.append(("dryRun", "All"))
        try:
            return self._call(
                "PATCH",
                ref.path,
                body=obj,
                query=query,
                content_type="application/apply-patch+yaml",
            )
        except ApiException as exc:
            raise KubeError(f"applying {ref}", exc) from exc

    def replace(self, previous: Obj) -> Obj:
        """Put ``previous`` back as it was (its spec, labels and annotations)."""
        ref = Ref.of(previous)
        current = self.get(ref)
        if current is None:
            restored = _restorable(previous)
            restored["metadata"].pop("resourceVersion", None)
            collection = ref.path.rsplit("/", 1)[0]
            try:
                return self._call("POST", collection, body=restored)
            except ApiException as exc:
                raise KubeError(f"re-creating {ref}", exc) from exc
        restored = _restorable(previous)
        restored["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            return self._call("PUT", ref.path, body=restored)
        except ApiException as exc:
            raise KubeError(f"restoring {ref}", exc) from exc

    def delete(self, ref: Ref) -> None:
        """Delete the object (gone already counts as done)."""
        try:
            self._call("DELETE", ref.path, body={"propagationPolicy": "Background"})
        except ApiException as exc:
            if exc.status != 404:
                raise KubeError(f"deleting {ref}", exc) from exc

    def proxy(
        self, namespace: str, service: str, port: str, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        """One HTTP request to a Service through the API server: (status, JSON body or text)."""
        url = f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy{path}"
        try:
            response = self.api.call_api(
                url,
                method,
                header_params={"Accept": "application/json", "Content-Type": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _return_http_data_only=True,
            )
            return response.status, _decode(response.data)
        except ApiException as exc:
            return exc.status, _decode(exc.body)


def _decode(data: bytes | str | None) -> Any:
    if not data:
        return None
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        return json.loads(text)
    except ValueError:
        return text


def _restorable(obj: Obj) -> Obj:
    """``obj`` without status and server-filled metadata, for a replace or re-create."""
    out = {k: v for k, v in obj.items() if k != "status"}
    out["metadata"] = {k: v for k, v in obj["metadata"].items() if k not in _SERVER_FIELDS}
    return out
