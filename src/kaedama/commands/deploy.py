"""``kaedama deploy MODEL_URI``: serve an exported model on Kubernetes, safely.

Renders the serving objects from the templates in ``manifests/base/serving`` (KServe
InferenceService with ``--mode kserve``, Deployment + Service + HPA + PDB +
NetworkPolicy with ``--mode raw``), applies them with server-side apply, waits for the
new version to be ready, smoke-tests ``/v2/health/ready`` and one inference, and prints
the URL. On any failure it restores the previous version (which keeps serving meanwhile)
and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import sys

from kaedama.config import add_stage_arguments, config_from_args
from kaedama.deploy.config import DeployConfig

HELP = (
    "Deploy an exported model to Kubernetes (KServe or plain), smoke-test it, roll back on failure."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add MODEL_URI and one flag per :class:`DeployConfig` field."""
    parser.add_argument(
        "model_uri",
        metavar="MODEL_URI",
        help="the exported model folder the server loads (gs://bucket/runs/v1/export; "
        "a path must exist inside the serving pod)",
    )
    add_stage_arguments(parser, DeployConfig)


def run(args: argparse.Namespace) -> int:
    """Deploy (or, with --dry-run, print the rendered objects) and report the URL."""
    config = config_from_args(DeployConfig, args)
    from kaedama.deploy.render import render, to_yaml

    if config.dry_run:
        sys.stdout.write(to_yaml(render(args.model_uri, config)))
        return 0
    from kaedama.deploy.run import deploy

    if not getattr(args, "verbose", False):
        # urllib3 logs a warning per retried connection; the deploy log says enough.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    result = deploy(args.model_uri, config)
    verb = "created" if result.created else "updated"
    print(f"{result.mode}: {verb} {result.name} in namespace {result.namespace}")
    print(f"model: {result.model_uri}")
    print(f"url: {result.url}")
    return 0
