"""Render the serving objects for one model from the templates in ``manifests/``.

The templates are the kustomize bases ``manifests/base/serving/{kserve,raw}``: this
module reads the resources their ``kustomization.yaml`` lists and sets what changes per
model (name, namespace, model URI, image, sizes), so `kubectl apply -k` and
`kaedama deploy` serve the same objects. Values in, values out: no cluster access here.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from kaedama.deploy.config import DeployConfig
from kaedama.errors import KaedamaError

Obj = dict[str, Any]
TEMPLATE_NAME = "kaedama"
MODEL_URI_ANNOTATION = "kaedama.io/model-uri"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
# The kind whose readiness decides a deploy, per mode.
PRIMARY_KIND = {"kserve": "InferenceService", "raw": "Deployment"}


def find_manifests(configured: str = "") -> Path:
    """The ``manifests/`` folder: the flag, then $KAEDAMA_MANIFESTS, then the checkout's."""
    candidates = [configured, os.environ.get("KAEDAMA_MANIFESTS", "")]
    candidates.append(str(Path(__file__).resolve().parents[3] / "manifests"))
    for candidate in filter(None, candidates):
        if (Path(candidate) / "base" / "serving").is_dir():
            return Path(candidate)
    raise KaedamaError(
        "cannot find the serving templates (manifests/base/serving): pass --manifests "
        "PATH_TO/manifests or set KAEDAMA_MANIFESTS (the kaedama image sets it)"
    )


def load_templates(manifests: Path, mode: str) -> list[Obj]:
    """The objects of ``manifests/base/serving/<mode>``, in its kustomization's order."""
    base = manifests / "base" / "serving" / mode
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    docs: list[Obj] = []
    for resource in kustomization.get("resources", []):
        path = base / resource
        if not path.is_file():
            raise KaedamaError(f"{path}: deploy renders plain resource files, not nested bases")
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def pod_spec(obj: Obj) -> Obj:
    """The pod spec (or the InferenceService predictor, which has the same shape)."""
    if obj["kind"] == "InferenceService":
        return obj["spec"]["predictor"]
    return obj["spec"]["template"]["spec"]


def serving_container(obj: Obj) -> Obj:
    """The one container that runs ``kaedama serve``."""
    containers = pod_spec(obj)["containers"]
    if len(containers) != 1:
        raise KaedamaError(f"{obj['kind']} template must have one container, has {len(containers)}")
    return containers[0]


def _set_flag(args: list[str], flag: str, value: Any) -> None:
    if flag in args:
        args[args.index(flag) + 1] = str(value)
    else:
        args.extend([flag, str(value)])


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _label_selectors(obj: Obj) -> list[Obj]:
    """Every label map that selects the serving pods (they all gain the instance label)."""
    spec, kind = obj.get("spec", {}), obj["kind"]
    if kind == "Deployment":
        maps = [spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]]
        for constraint in spec["template"]["spec"].get("topologySpreadConstraints", []):
            maps.append(constraint["labelSelector"]["matchLabels"])
        return maps
    if kind == "Service":
        return [spec["selector"]]
    if kind == "PodDisruptionBudget":
        return [spec["selector"]["matchLabels"]]
    if kind == "NetworkPolicy":
        return [spec["podSelector"]["matchLabels"]]
    if kind == "InferenceService":
        return [spec["predictor"].setdefault("labels", {})]
    return []


def _configure_server(obj: Obj, model_uri: str, config: DeployConfig) -> None:
    container = serving_container(obj)
    args = container["args"]
    args[0] = model_uri
    if config.max_batch_size is not None:
        _set_flag(args, "--max-batch-size", config.max_batch_size)
    if config.max_queue is not None:
        _set_flag(args, "--max-queue", config.max_queue)
    if config.image:
        container["image"] = config.image
    requests = container.setdefault("resources", {}).setdefault("requests", {})
    limits = container["resources"].setdefault("limits", {})
    if config.cpu:
        # The template's limit stays as burst headroom unless the request exceeds it.
        requests["cpu"] = config.cpu
        if _cpu_millis(config.cpu) > _cpu_millis(limits.get("cpu", "0")):
            limits["cpu"] = config.cpu
    if config.memory:
        # Memory is not compressible: limit = request, so a pod is never OOM-killed early.
        requests["memory"] = limits["memory"] = config.memory


def _cpu_millis(value: str) -> float:
    return float(value[:-1]) if value.endswith("m") else float(value) * 1000


def _check_replicas(kind: str, low: int, high: int) -> None:
    if low > high:
        raise KaedamaError(
            f"{kind}: min replicas {low} exceed max replicas {high}; pass both "
            "--min-replicas and --max-replicas"
        )


def render(model_uri: str, config: DeployConfig) -> list[Obj]:
    """The serving objects for ``model_uri`` (local path or gs://), ready to apply."""
    if not model_uri or model_uri.startswith("-"):
        raise KaedamaError(f"MODEL_URI {model_uri!r} must be an exported model folder or gs:// URI")
    objects = copy.deepcopy(load_templates(find_manifests(config.manifests), config.mode))
    primary = PRIMARY_KIND[config.mode]
    if not any(o["kind"] == primary for o in objects):
        raise KaedamaError(f"the {config.mode} templates hold no {primary}")
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        if meta.get("name") == TEMPLATE_NAME:
            meta["name"] = config.name
        meta["namespace"] = config.namespace
        meta.setdefault("labels", {}).update(
            {INSTANCE_LABEL: config.name, MANAGED_BY_LABEL: "kaedama-deploy"}
        )
        meta.setdefault("annotations", {})[MODEL_URI_ANNOTATION] = model_uri
        for labels in _label_selectors(obj):
            labels[INSTANCE_LABEL] = config.name
        kind, spec = obj["kind"], obj.get("spec", {})
        if kind in ("Deployment", "InferenceService"):
            _configure_server(obj, model_uri, config)
        if kind == "Deployment":
            # A new model URI changes the pod template, so the Deployment rolls out.
            annotations = spec["template"]["metadata"].setdefault("annotations", {})
            annotations[MODEL_URI_ANNOTATION] = model_uri
        if kind == "InferenceService":
            predictor = spec["predictor"]
            if config.min_replicas is not None:
                predictor["minReplicas"] = config.min_replicas
            if config.max_replicas is not None:
                predictor["maxReplicas"] = config.max_replicas
            if config.scale_target is not None:
                predictor["scaleTarget"] = config.scale_target
            _check_replicas(kind, predictor.get("minReplicas", 1), predictor["maxReplicas"])
            queue = _flag(serving_container(obj)["args"], "--max-queue")
            if queue is not None:
                # The hard per-pod limit is what the server's bounded queue admits.
                predictor["containerConcurrency"] = int(queue)
        if kind == "HorizontalPodAutoscaler":
            spec["scaleTargetRef"]["name"] = config.name
            if config.min_replicas is not None:
                spec["minReplicas"] = max(1, config.min_replicas)
            if config.max_replicas is not None:
                spec["maxReplicas"] = config.max_replicas
            _check_replicas(kind, spec.get("minReplicas", 1), spec["maxReplicas"])
    return objects


def to_yaml(objects: list[Obj]) -> str:
    """The objects as one multi-document YAML stream (what --dry-run prints)."""
    return yaml.safe_dump_all(objects, sort_keys=False, allow_unicode=True)
