"""The deploy stage's configuration (``kaedama deploy`` flags mirror its fields)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from kaedama.config import ConfigError

# Kubernetes object and namespace names: RFC 1123 labels.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


@dataclass(frozen=True)
class DeployConfig:
    """How to serve one exported model. Unset sizes keep the templates' values."""

    mode: Literal["kserve", "raw"] = field(
        default="kserve",
        metadata={
            "help": "kserve: a KServe InferenceService; raw: Deployment + Service + HPA + "
            "PodDisruptionBudget + NetworkPolicy (no KServe needed)"
        },
    )
    namespace: str = field(default="kaedama", metadata={"help": "Kubernetes namespace"})
    name: str = field(
        default="kaedama", metadata={"help": "name of the serving objects (one per model line)"}
    )
    model_name: str = field(
        default="kaedama",
        metadata={
            "help": "the model's name in the Open Inference Protocol paths (/v2/models/NAME)"
        },
    )
    image: str = field(
        default="", metadata={"help": "serving image; empty keeps the template's kaedama-serve"}
    )
    min_replicas: int | None = field(
        default=None, metadata={"help": "warm replicas kept for bursts; unset keeps the template's"}
    )
    max_replicas: int | None = field(
        default=None, metadata={"help": "replica ceiling; unset keeps the template's"}
    )
    scale_target: int | None = field(
        default=None,
        metadata={
            "help": "kserve: in-flight requests per pod to scale at; unset keeps the template's"
        },
    )
    max_batch_size: int | None = field(
        default=None, metadata={"help": "server --max-batch-size; unset keeps the template's"}
    )
    max_queue: int | None = field(
        default=None,
        metadata={
            "help": "server --max-queue (kserve's containerConcurrency follows it); unset "
            "keeps the template's"
        },
    )
    cpu: str = field(default="", metadata={"help": "CPU request per pod, e.g. 2 or 500m"})
    memory: str = field(default="", metadata={"help": "memory request per pod, e.g. 2Gi"})
    timeout: float = field(
        default=600.0, metadata={"help": "seconds to wait for the new version to be ready"}
    )
    poll_interval: float = field(default=5.0, metadata={"help": "seconds between status reads"})
    smoke: bool = field(
        default=True,
        metadata={"help": "check /v2/health/ready and one inference before reporting success"},
    )
    smoke_url: str = field(
        default="",
        metadata={
            "help": "base URL for the smoke test, e.g. a port-forward; empty: raw mode uses "
            "the Service in a pod and the API server's service proxy elsewhere, kserve "
            "the InferenceService's cluster address"
        },
    )
    rollback: bool = field(
        default=True,
        metadata={"help": "on failure, restore the previous version (it keeps serving)"},
    )
    manifests: str = field(
        default="",
        metadata={
            "help": "the manifests/ folder holding the templates; empty: $KAEDAMA_MANIFESTS, "
            "then the checkout's manifests/"
        },
    )
    kubeconfig: str = field(
        default="",
        metadata={"help": "kubeconfig file; empty: $KUBECONFIG, ~/.kube/config, in-cluster"},
    )
    context: str = field(default="", metadata={"help": "kubeconfig context"})
    dry_run: bool = field(
        default=False, metadata={"help": "print the rendered objects as YAML and stop"}
    )

    def __post_init__(self) -> None:
        for key in ("namespace", "name"):
            value = getattr(self, key)
            if not _DNS_LABEL.match(value) or len(value) > 53:
                raise ConfigError(
                    f"{key} {value!r} is not a Kubernetes name: lowercase letters, digits and "
                    "'-', starting and ending with a letter or digit, at most 53 characters"
                )
        if not self.model_name or "/" in self.model_name:
            raise ConfigError(f"model_name {self.model_name!r} must be non-empty, without '/'")
        for key in ("min_replicas", "max_replicas", "scale_target", "max_batch_size", "max_queue"):
            value = getattr(self, key)
            if value is not None and value < (0 if key == "min_replicas" else 1):
                raise ConfigError(f"{key} must be >= {0 if key == 'min_replicas' else 1}")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise ConfigError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        if self.scale_target is not None and self.mode != "kserve":
            raise ConfigError("scale_target applies to --mode kserve (raw scales on CPU)")
        for key in ("cpu", "memory"):
            value = getattr(self, key)
            if value and not _QUANTITY.match(value):
                raise ConfigError(
                    f"{key} {value!r} is not a Kubernetes quantity (e.g. 2, 500m, 2Gi)"
                )
        for key in ("timeout", "poll_interval"):
            value = getattr(self, key)
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key} must be a positive number of seconds, got {value}")
