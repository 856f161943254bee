"""Deploy an exported model to Kubernetes: render, apply, wait, smoke-test, roll back.

``render`` builds the serving objects from the templates in ``manifests/base/serving``
(the same files kustomize builds); ``kube`` is a small resource client over the
``kubernetes`` API client; ``rollout`` reads readiness from object status; ``smoke``
checks a served model over HTTP; ``run`` ties them together.
"""

from kaedama.deploy.config import DeployConfig

__all__ = ["DeployConfig"]
