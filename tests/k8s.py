"""Offline Kubernetes manifest checks: kustomize builds and CRD schema validation."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _find_schemas() -> Path:
    """``shared/schemas`` next to the checkout, or next to a folder above it (a git worktree)."""
    for folder in REPO.parents:
        candidate = folder / "shared" / "schemas"
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "schemas"


SCHEMAS = _find_schemas()


def kustomize(path: Path) -> list[dict[str, Any]]:
    """Render a kustomization with ``kubectl kustomize`` (skips where kubectl is absent)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: cannot build kustomize overlays")
    result = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _to_jsonschema(node: Any, strict: bool = False) -> Any:
    """Translate the Kubernetes OpenAPI extensions that plain JSON Schema lacks.

    ``strict`` also refuses fields a schema does not declare (as the API server's
    pruning would silently drop them), so a misspelt field fails the test.
    """
    if isinstance(node, dict):
        out = {
            k: _to_jsonschema(v, strict)
            for k, v in node.items()
            if not k.startswith("x-kubernetes")
        }
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
            out = {}
        elif (
            strict
            and isinstance(node.get("properties"), dict)
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_to_jsonschema(v, strict) for v in node]
    return node


@cache
def _load_crd(path: Path) -> dict[str, Any]:
    # The KServe CRD is ~2 MB of YAML: libyaml parses it in seconds, pure Python in tens.
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@cache
def crd_schema(filename: str, version: str, strict: bool = False) -> dict[str, Any]:
    """The openAPIV3Schema of ``version`` in ``../shared/schemas/<filename>``."""
    path = SCHEMAS / filename
    if not path.is_file():
        pytest.skip(f"CRD schema {path} not found (../shared/schemas is only on project machines)")
    crd = _load_crd(path)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _to_jsonschema(v["schema"]["openAPIV3Schema"], strict)
    raise AssertionError(f"{filename} has no version {version}")


@cache
def _crd_validator(filename: str, version: str, strict: bool) -> jsonschema.protocols.Validator:
    # One validator per schema: jsonschema.validate() re-checks the (large) schema each call.
    schema = crd_schema(filename, version, strict)
    return jsonschema.validators.validator_for(schema)(schema)


def validate_crd(doc: dict[str, Any], filename: str, *, strict: bool = False) -> None:
    """Validate one object against its CRD schema; raises the first error, with its path."""
    version = doc["apiVersion"].split("/")[-1]
    _crd_validator(filename, version, strict).validate(doc)


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs (or pod-spec-shaped blocks) inside one rendered object."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "InferenceService":
        return [spec[c] for c in ("predictor", "transformer", "explainer") if c in spec]
    if kind == "TrainJob":
        out = []
        for patch in spec.get("runtimePatches", []):
            runtime = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {})
            for job in runtime.get("replicatedJobs", []):
                out.append(job["template"]["spec"]["template"]["spec"])
        return out
    return []


def container_problems(doc: dict[str, Any]) -> list[str]:
    """Every missing hardening or sizing setting on every container of ``doc``."""
    problems = []
    specs = pod_specs(doc)
    if doc["kind"] == "TrainJob" and not specs:
        problems.append("TrainJob: no runtimePatches carry the pod security settings")
    for pod in specs:
        pod_sc = pod.get("securityContext", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem must be true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities must drop ALL")
            if sc.get("capabilities", {}).get("add"):
                problems.append(f"{where}: adds capabilities")
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                problems.append(f"{where}: runAsNonRoot must be true")
            if sc.get("runAsUser", pod_sc.get("runAsUser", 1)) == 0:
                problems.append(f"{where}: runs as uid 0")
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{where}: seccompProfile must be RuntimeDefault")
            resources = c.get("resources")
            if doc["kind"] == "TrainJob":
                resources = doc["spec"]["trainer"].get("resourcesPerNode")
            for part in ("requests", "limits"):
                have = (resources or {}).get(part, {})
                if not {"cpu", "memory"} <= set(have):
                    problems.append(f"{where}: resources.{part} needs cpu and memory")
    return problems
