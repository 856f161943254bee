"""Launch a multi-node training run as a Kubeflow Trainer v2 ``TrainJob`` and watch it.

The pipeline's train step uses this when it asks for more than one node: it creates
the TrainJob (the same spec as ``manifests/base/train/trainjob.yaml``: the
``torch-distributed`` runtime starts one pod per node and ``torchrun -m kaedama.train``
in each), polls its status, reports progress as it goes (the run's ``history.json``
grows by one record per epoch) and returns the run's ``result.json``. Kubernetes does
the scheduling; this only asks and waits.

The ``kubernetes`` client is imported when a job is launched (the ``kfp`` extra).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kaedama import storage
from kaedama.errors import KaedamaError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"


class LaunchError(KaedamaError):
    """The TrainJob could not be created, failed, or did not finish in time."""


@dataclass(frozen=True)
class TrainLaunch:
    """What to run where: a ``kaedama train`` command line spread over ``nodes`` pods."""

    manifest: str
    out: str
    args: tuple[str, ...] = ()
    image: str = "kaedama:latest"
    nodes: int = 2
    gpus_per_node: int = 0
    namespace: str = "default"
    name: str = ""
    runtime: str = "torch-distributed"
    cpu: str = "4"
    memory: str = "16Gi"
    service_account: str = "kaedama-train"
    timeout_s: float = 24 * 3600.0
    poll_s: float = 15.0
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise LaunchError(
                f"nodes must be >= 1 and GPUs >= 0 (got {self.nodes}, {self.gpus_per_node})"
            )
        if not storage.is_gcs(self.manifest) or not storage.is_gcs(self.out):
            raise LaunchError(
                "a TrainJob's pods share no disk with this process: give gs:// URIs for the "
                f"manifest and the output (got {self.manifest!r}, {self.out!r})"
            )

    def job_name(self) -> str:
        """A valid, unique-enough object name (DNS-1035 label)."""
        if self.name:
            return self.name
        stem = re.sub(r"[^a-z0-9-]+", "-", self.out.rstrip("/").rsplit("/", 1)[-1].lower())
        return f"kaedama-{stem.strip('-')[:40] or 'train'}-{int(time.time()) % 10**6}"


def render_trainjob(job: TrainLaunch) -> dict[str, Any]:
    """The TrainJob object for ``job`` (validated against the CRD schema in the tests)."""
    resources: dict[str, Any] = {
        "requests": {"cpu": job.cpu, "memory": job.memory},
        "limits": {"cpu": job.cpu, "memory": job.memory},
    }
    if job.gpus_per_node:
        resources["limits"]["nvidia.com/gpu"] = str(job.gpus_per_node)
        resources["requests"]["nvidia.com/gpu"] = str(job.gpus_per_node)
    command = ["torchrun"]
    if job.gpus_per_node > 1:
        command.append(f"--nproc_per_node={job.gpus_per_node}")
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": job.job_name(),
            "namespace": job.namespace,
            "labels": {
                "app.kubernetes.io/name": "kaedama",
                "app.kubernetes.io/component": "train",
                **job.labels,
            },
        },
        "spec": {
            "runtimeRef": {
                "apiGroup": GROUP,
                "kind": "ClusterTrainingRuntime",
                "name": job.runtime,
            },
            "trainer": {
                "image": job.image,
                "command": [*command, "-m", "kaedama.train"],
                # --resume: a pod restarted after preemption continues from last.pt.
                "args": [job.manifest, "--out", job.out, "--resume", *job.args],
                "numNodes": job.nodes,
                "resourcesPerNode": resources,
            },
        },
    }


def _api(client_config: Any = None):
    try:
        from kubernetes import client, config
    except ModuleNotFoundError as exc:
        raise LaunchError(
            "launching a TrainJob needs the kubernetes client: pip install 'kaedama[kfp]'"
        ) from exc
    if client_config is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return client.CustomObjectsApi()
    return client.CustomObjectsApi(client.ApiClient(client_config))


def _condition(status: dict[str, Any]) -> str:
    """``Complete``, ``Failed`` or ``""`` (still going) from a TrainJob's status."""
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return str(cond["type"])
    return ""


def _progress(out: str) -> dict[str, float]:
    """Figures from the run's history so far (written by rank 0 after every epoch)."""
    uri = storage.join(out, "history.json")
    try:
        history = json.loads(storage.read_text(uri)) if storage.exists(uri) else []
    except (storage.StorageError, ValueError):
        return {}  # being rewritten right now: next poll
    if not history:
        return {}
    last = history[-1]
    figures = {"epochs_done": float(len(history))}
    if isinstance(last.get("val_acc"), (int, float)):
        figures["val_acc"] = float(last["val_acc"])
    return figures


def launch_trainjob(
    job: TrainLaunch,
    *,
    on_status: Callable[[str, float], None] | None = None,
    client_config: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Create the TrainJob, wait until it completes, return the run's ``result.json``.

    Args:
        job: what to run.
        on_status: called with ``(name, value)`` figures as the job progresses
            (elapsed seconds, epochs done, last validation accuracy).
        client_config: a ``kubernetes.client.Configuration`` (default: in-cluster,
            else the kubeconfig).
        sleep: how to wait between polls.

    Raises:
        LaunchError: creation refused, the job failed, or ``job.timeout_s`` passed.
    """
    from kubernetes.client.exceptions import ApiException

    api = _api(client_config)
    body = render_trainjob(job)
    name = body["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, job.namespace, PLURAL, body)
    except ApiException as exc:
        raise LaunchError(
            f"cannot create TrainJob {job.namespace}/{name}: {exc.status} {exc.reason}; "
            "is Kubeflow Trainer installed and may this service account create trainjobs?"
        ) from exc
    log.info("created TrainJob %s/%s (%d nodes)", job.namespace, name, job.nodes)
    start = time.monotonic()
    report = on_status or (lambda key, value: None)
    while True:
        elapsed = time.monotonic() - start
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, job.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status not in (429, 500, 502, 503, 504):
                raise LaunchError(
                    f"cannot read TrainJob {name}: {exc.status} {exc.reason}"
                ) from exc
            obj = {}
        state = _condition(obj.get("status") or {})
        report("elapsed_seconds", round(elapsed, 1))
        for key, value in _progress(job.out).items():
            report(key, value)
        if state == "Complete":
            return json.loads(storage.read_text(storage.join(job.out, "result.json")))
        if state == "Failed":
            message = next(
                (
                    c.get("message", "")
                    for c in obj["status"]["conditions"]
                    if c.get("type") == "Failed"
                ),
                "",
            )
            raise LaunchError(f"TrainJob {name} failed: {message or 'see the pods logs'}")
        if elapsed > job.timeout_s:
            raise LaunchError(f"TrainJob {name} not finished after {job.timeout_s:.0f} s")
        sleep(job.poll_s)
