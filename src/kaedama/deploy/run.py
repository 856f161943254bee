"""``deploy``: render, apply, wait for Ready, smoke-test, report; roll back on failure."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kaedama.deploy.config import DeployConfig
from kaedama.deploy.kube import Kube, KubeError, Ref, api_client
from kaedama.deploy.render import PRIMARY_KIND, render
from kaedama.deploy.rollout import FAILED, READY, STATE_OF
from kaedama.deploy.smoke import SmokeTestFailed, http_requester, smoke_test
from kaedama.errors import KaedamaError

log = logging.getLogger(__name__)


class DeployFailed(KaedamaError):
    """The new version did not become ready or failed its smoke test (and was rolled back)."""


@dataclass(frozen=True)
class DeployResult:
    """What was deployed and where it answers."""

    name: str
    namespace: str
    mode: str
    model_uri: str
    url: str
    created: bool


def _primary(objects: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == PRIMARY_KIND[mode])


def wait_ready(
    kube: Kube,
    ref: Ref,
    timeout: float,
    poll_interval: float,
    *,
    previous: dict[str, Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll ``ref`` until it is ready; DeployFailed on a fatal condition or the timeout.

    ``previous`` is the object before this deploy touched it (None for a first deploy).
    """
    state_of = STATE_OF[ref.kind]
    deadline = clock() + timeout
    message = "not read yet"
    while True:
        obj = kube.get(ref)
        if obj is None:
            raise DeployFailed(f"{ref} disappeared while waiting for it")
        state, message = state_of(obj, previous)
        if state == READY:
            log.info("%s: %s", ref, message)
            return obj
        if state == FAILED:
            raise DeployFailed(f"{ref} failed: {message}")
        log.info("%s: %s", ref, message)
        if clock() + poll_interval > deadline:
            raise DeployFailed(f"{ref} not ready after {timeout:g} s: {message}")
        time.sleep(poll_interval)


def service_url(obj: dict[str, Any], config: DeployConfig) -> str:
    """The URL clients use: KServe's reported URL, or the Service's cluster DNS name."""
    if obj["kind"] == "InferenceService":
        status = obj.get("status", {})
        return status.get("url") or status.get("address", {}).get("url", "")
    return f"http://{config.name}.{config.namespace}.svc.cluster.local"


PROXY = "proxy"


def smoke_target(obj: dict[str, Any], config: DeployConfig, *, in_cluster: bool) -> str:
    """Where the smoke test goes: a base URL, or PROXY (through the API server).

    In a pod (the pipeline's deploy step) the Service's cluster address is reachable and
    admitted by the NetworkPolicy (same namespace); from outside the cluster only the API
    server is, so raw mode goes through its service proxy there.
    """
    if config.smoke_url:
        return config.smoke_url
    if obj["kind"] == "InferenceService":
        status = obj.get("status", {})
        address = status.get("address", {}).get("url") or status.get("url")
        if not address:
            raise DeployFailed(
                "the InferenceService reports no address to smoke-test; pass --smoke-url"
            )
        return address
    return service_url(obj, config) if in_cluster else PROXY


def _requester(kube: Kube, obj: dict[str, Any], config: DeployConfig):
    target = smoke_target(obj, config, in_cluster=bool(os.environ.get("KUBERNETES_SERVICE_HOST")))
    if target != PROXY:
        log.info("smoke test: %s", target)
        return http_requester(target)
    log.info("smoke test: through the API server's proxy to Service %s", config.name)

    def request(method: str, path: str, body: Any = None):
        return kube.proxy(config.namespace, config.name, "http", method, path, body)

    return request


def rollback(kube: Kube, applied: list[Ref], previous: dict[Ref, dict[str, Any] | None]) -> None:
    """Put every touched object back: restore what existed, delete what was new."""
    for ref in reversed(applied):
        before = previous.get(ref)
        if before is None:
            log.warning("rollback: deleting the new %s", ref)
            kube.delete(ref)
        else:
            log.warning("rollback: restoring the previous %s", ref)
            kube.replace(before)


def deploy(
    model_uri: str,
    config: DeployConfig,
    *,
    kube: Kube | None = None,
    smoke_tries: int = 5,
) -> DeployResult:
    """Serve ``model_uri``; on failure restore the previous version and raise DeployFailed."""
    objects = render(model_uri, config)
    kube = kube or Kube(api_client(config.kubeconfig, config.context))
    refs = [Ref.of(o) for o in objects]
    previous = {ref: kube.get(ref) for ref in refs}
    primary = Ref.of(_primary(objects, config.mode))
    applied: list[Ref] = []
    try:
        for obj, ref in zip(objects, refs, strict=True):
            log.info("applying %s", ref)
            kube.apply(obj)
            applied.append(ref)
        ready = wait_ready(
            kube, primary, config.timeout, config.poll_interval, previous=previous[primary]
        )
        if config.smoke:
            smoke_test(
                _requester(kube, ready, config),
                config.model_name,
                tries=smoke_tries,
                backoff=min(1.0, config.poll_interval),
            )
            log.info("smoke test passed: %s answered one inference", primary)
    except (DeployFailed, SmokeTestFailed, KubeError) as exc:
        if not config.rollback or not applied:
            raise DeployFailed(f"deploy of {model_uri} failed: {exc}") from exc
        try:
            rollback(kube, applied, previous)
        except KubeError as failed:
            raise DeployFailed(
                f"deploy of {model_uri} failed ({exc}) and so did the rollback ({failed}); "
                f"inspect {primary} (e.g. kubectl rollout undo for a Deployment)"
            ) from exc
        kept = "the previous version keeps serving" if previous[primary] else "nothing was left"
        raise DeployFailed(
            f"deploy of {model_uri} failed and was rolled back ({kept}): {exc}"
        ) from exc
    return DeployResult(
        name=config.name,
        namespace=config.namespace,
        mode=config.mode,
        model_uri=model_uri,
        url=service_url(ready, config),
        created=previous[primary] is None,
    )
