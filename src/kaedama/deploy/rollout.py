"""Is a rollout done? Readiness of a Deployment or InferenceService from its status.

Pure functions of the object as the API server returns it, so the rules are testable
without a cluster. Each returns ``(state, message)`` with state one of ``READY``,
``PROGRESSING`` or ``FAILED``.
"""

from __future__ import annotations

from typing import Any

READY, PROGRESSING, FAILED = "ready", "progressing", "failed"
# Condition reasons after which waiting longer cannot help.
_FATAL_REASONS = {"ProgressDeadlineExceeded", "RevisionFailed", "RevisionMissing"}


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in obj.get("status", {}).get("conditions", []) or []}


def _observed(obj: dict[str, Any]) -> bool:
    generation = obj.get("metadata", {}).get("generation")
    observed = obj.get("status", {}).get("observedGeneration")
    return generation is None or (observed is not None and observed >= generation)


def _predictor(obj: dict[str, Any] | None) -> dict[str, Any]:
    return ((obj or {}).get("status") or {}).get("components", {}).get("predictor", {})


def deployment_state(
    obj: dict[str, Any], previous: dict[str, Any] | None = None
) -> tuple[str, str]:
    """``kubectl rollout status`` rules: new pods updated, available, old ones gone."""
    if not _observed(obj):
        return PROGRESSING, "waiting for the Deployment controller to see the new spec"
    progressing = _conditions(obj).get("Progressing", {})
    if progressing.get("reason") in _FATAL_REASONS:
        return FAILED, progressing.get("message") or progressing["reason"]
    status, want = obj.get("status", {}), obj.get("spec", {}).get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    if updated < want:
        return PROGRESSING, f"{updated} of {want} new pods created"
    if status.get("replicas", 0) > updated:
        return PROGRESSING, f"{status['replicas'] - updated} old pods still terminating"
    available = status.get("availableReplicas", 0)
    if available < updated:
        return PROGRESSING, f"{available} of {updated} new pods ready"
    return READY, f"{available} pods ready"


def inference_service_state(
    obj: dict[str, Any], previous: dict[str, Any] | None = None
) -> tuple[str, str]:
    """Ready when KServe reports Ready for this spec and its latest revision serves.

    KServe versions differ in whether they set ``status.observedGeneration``; where it
    is absent and the spec changed, a new predictor revision (Knative creates one per
    template change) must appear before a Ready condition counts: the one read right
    after applying may still describe the previous revision.
    """
    if "observedGeneration" in obj.get("status", {}):
        if not _observed(obj):
            return PROGRESSING, "waiting for KServe to see the new spec"
    elif previous is not None and _spec_changed(obj, previous):
        before = _predictor(previous).get("latestCreatedRevision")
        if before and _predictor(obj).get("latestCreatedRevision") in (None, before):
            return PROGRESSING, f"waiting for a new revision (serving: {before})"
    conditions = _conditions(obj)
    for condition in conditions.values():
        if condition.get("status") == "False" and condition.get("reason") in _FATAL_REASONS:
            return FAILED, f"{condition['type']}: {condition.get('message') or condition['reason']}"
    predictor = obj.get("status", {}).get("components", {}).get("predictor", {})
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    if created and created != ready:
        return PROGRESSING, f"revision {created} not ready yet (serving: {ready or 'none'})"
    ready_condition = conditions.get("Ready", {})
    if ready_condition.get("status") == "True":
        return READY, "InferenceService ready"
    return PROGRESSING, ready_condition.get("message") or "InferenceService not ready yet"


def _spec_changed(obj: dict[str, Any], previous: dict[str, Any]) -> bool:
    before = previous.get("metadata", {}).get("generation")
    return before is None or obj.get("metadata", {}).get("generation") != before


STATE_OF = {"Deployment": deployment_state, "InferenceService": inference_service_state}
