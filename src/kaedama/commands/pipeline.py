"""``kaedama pipeline compile|submit|run-local``: the Kubeflow pipeline from the command line.

::

    kaedama pipeline compile --out kaedama.yaml --image REGISTRY/kaedama:TAG \
        --train-image REGISTRY/kaedama-train:TAG
    kaedama pipeline submit --host https://kfp.example.com --experiment pets \\
        --param data_uri=gs://b/photos --param epochs=20 --image REGISTRY/kaedama:TAG
    kaedama pipeline run-local --param data_uri=./photos --root out/pipeline

``--param NAME=VALUE`` sets a pipeline parameter (repeatable); values are read as the
parameter's type (``epochs=20``, ``pretrained=false``, ``train_options=["lr=0.01"]``).
``run-local`` runs every step in this machine's Python (``kfp.local``'s
SubprocessRunner): no cluster, no containers, so GPU and memory requests are ignored
and a deploy step needs a reachable Kubernetes API (use ``deploy_mode=none``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Any

from kaedama.errors import KaedamaError

HELP = "Compile, submit or run locally the Kubeflow pipeline (dedup -> ... -> deploy)."
DEFAULT_IMAGE = "ghcr.io/kaedama/kaedama:0.1.0"
DEFAULT_TRAIN_IMAGE = "ghcr.io/kaedama/kaedama-train:0.1.0"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the pipeline sub-commands."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--image",
            default=DEFAULT_IMAGE,
            help=f"the image of the light steps: dedup, split, deploy (default: {DEFAULT_IMAGE})",
        )
        p.add_argument(
            "--train-image",
            default=DEFAULT_TRAIN_IMAGE,
            help="the image of the torch steps: train (and its TrainJob), evaluate, export "
            f"(default: {DEFAULT_TRAIN_IMAGE})",
        )

    def params(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--param",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="a pipeline parameter, e.g. data_uri=gs://b/photos (repeatable)",
        )

    comp = sub.add_parser("compile", help="write the pipeline as KFP YAML")
    comp.add_argument("--out", default="kaedama_pipeline.yaml", metavar="FILE")
    common(comp)
    submit = sub.add_parser("submit", help="submit a run to a Kubeflow Pipelines endpoint")
    submit.add_argument("--host", required=True, metavar="URL", help="KFP API endpoint")
    submit.add_argument("--experiment", default="kaedama", metavar="NAME")
    submit.add_argument("--run-name", default="", metavar="NAME")
    common(submit)
    params(submit)
    local = sub.add_parser("run-local", help="run every step on this machine (kfp.local)")
    local.add_argument(
        "--root", default="out/pipeline", metavar="DIR", help="where the steps' artifacts go"
    )
    common(local)
    params(local)


def _signature():
    from pipelines.kaedama_pipeline import build_pipeline

    return inspect.signature(build_pipeline().pipeline_func)


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings -> typed pipeline arguments (checked against the pipeline)."""
    sig = _signature()
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in sig.parameters:
            known = ", ".join(sig.parameters)
            raise KaedamaError(f"--param {pair!r}: expected NAME=VALUE with NAME one of {known}")
        kind = sig.parameters[name].annotation
        kind = {"int": int, "float": float, "bool": bool, "str": str, "list": list}.get(kind, kind)
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1", "yes")
            elif kind is list:
                value = json.loads(raw)
                if not isinstance(value, list):
                    raise ValueError(raw)
            else:
                value = kind(raw)
        except ValueError as exc:
            raise KaedamaError(f"--param {name}: {raw!r} is not a valid {kind.__name__}") from exc
        out[name] = value
    missing = [
        n
        for n, p in sig.parameters.items()
        if p.default is inspect.Parameter.empty and n not in out
    ]
    if missing:
        raise KaedamaError(f"missing required pipeline parameter(s): {', '.join(missing)}")
    return out


def run(args: argparse.Namespace) -> int:
    """Compile, submit or run the pipeline."""
    try:
        from kfp import compiler

        from pipelines.kaedama_pipeline import build_pipeline
    except ModuleNotFoundError as exc:
        raise KaedamaError(
            f"the pipeline needs the Kubeflow Pipelines SDK ({exc}): pip install 'kaedama[kfp]'"
        ) from exc
    pipeline = build_pipeline(args.image, args.train_image)
    if args.action == "compile":
        compiler.Compiler().compile(pipeline, args.out)
        print(f"wrote {args.out}")
        return 0
    arguments = parse_params(args.param)
    if args.action == "submit":
        import kfp

        client = kfp.Client(host=args.host)
        run = client.create_run_from_pipeline_func(
            pipeline,
            arguments=arguments,
            experiment_name=args.experiment,
            run_name=args.run_name or None,
        )
        print(f"submitted run {run.run_id} to {args.host} (experiment {args.experiment})")
        return 0
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=args.root)
    task = pipeline(**arguments)
    print(json.dumps({"root": args.root, "outputs": _plain(task)}, indent=2), file=sys.stdout)
    return 0


def _plain(task: Any) -> dict[str, Any]:
    """A finished local pipeline's outputs as JSON-friendly values (artifacts by path)."""
    outputs = getattr(task, "outputs", None) or {}
    return {k: getattr(v, "path", v) for k, v in outputs.items()}
