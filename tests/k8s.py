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


def _to_jsonschema(node: Any) -> Any:
    """Translate the Kubernetes OpenAPI extensions that plain JSON Schema lacks."""
    if isinstance(node, dict):
        out = {k: _to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
            out = {}
        return out
    if isinstance(node, list):
        return [_to_jsonschema(v) for v in node]
    return node


@cache
def crd_schema(filename: str, version: str) -> dict[str, Any]:
    """The openAPIV3Schema of ``version`` in ``../shared/schemas/<filename>``."""
    path = SCHEMAS / filename
    if not path.is_file():
        pytest.skip(f"CRD schema {path} not found (../shared/schemas is only on project machines)")
    crd = yaml.safe_load(path.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _to_jsonschema(v["schema"]["openAPIV3Schema"])
    raise AssertionError(f"{filename} has no version {version}")


def validate_crd(doc: dict[str, Any], filename: str) -> None:
    """Validate one object against its CRD schema; raises with the failing path."""
    version = doc["apiVersion"].split("/")[-1]
    jsonschema.validate(doc, crd_schema(filename, version))
