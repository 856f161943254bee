"""The pipeline's components: one thin, typed KFP v2 component per kaedama stage.

Every component runs in the kaedama job image (nothing is pip-installed when a task
starts: ``install_kfp_package=False``) and calls the stage's command line,
``kaedama.cli.main([...])``, with an argument list: the same code path, flags and
validation as ``kaedama STAGE`` on a laptop. Parameters mirror the fields of the
stage's config dataclass; ``options`` passes any other field as ``key=value``
(``--set``). Artifacts are folders: a Dataset holds a stage's output folder
(``manifest.jsonl`` and friends), a Model a training run or an exported model.

Component bodies are serialised by KFP and run on their own in the task, so each one
imports what it needs inside; the builder takes the image at call time (never at
import), so ``kaedama pipeline compile --image ...`` picks it.
"""

# No `from __future__ import annotations`: KFP reads the annotation objects themselves.
from types import SimpleNamespace
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

DEFAULT_IMAGE = "ghcr.io/kaedama/kaedama:0.1.0"
# torch steps run in the training image (CUDA, torch, timm; kfp for the KFP executor).
DEFAULT_TRAIN_IMAGE = "ghcr.io/kaedama/kaedama-train:0.1.0"


def dedup(
    data_uri: str,
    dedup_out: Output[Dataset],
    review: Output[HTML],
    threshold: int = 4,
    conflict_policy: str = "drop_all",
    runner: str = "",
    beam_args: str = "",
    options: list = [],  # noqa: B006 - KFP reads the default; the list is never mutated
) -> NamedTuple(
    "DedupOutputs", [("input", int), ("kept", int), ("dropped", int), ("rejected", int)]
):
    """Clean ``data_uri`` (folder, list or ``gs://`` prefix): duplicates and label conflicts."""
    import json
    import os
    import shutil
    from collections import namedtuple

    from kaedama import cli

    args = ["dedup", data_uri, "--out", dedup_out.path, "--threshold", str(threshold)]
    args += ["--conflict-policy", conflict_policy]
    if runner:
        args += ["--runner", runner]
    if beam_args:
        args += ["--beam-args", beam_args]
    for item in options:
        args += ["--set", str(item)]
    if cli.main(args) != 0:
        raise RuntimeError(f"kaedama {' '.join(args)} failed")
    os.makedirs(os.path.dirname(review.path) or ".", exist_ok=True)
    shutil.copyfile(os.path.join(dedup_out.path, "report.html"), review.path)
    with open(os.path.join(dedup_out.path, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    out = namedtuple("DedupOutputs", ["input", "kept", "dropped", "rejected"])
    return out(summary["input"], summary["kept"], summary["dropped"], summary["rejected"])


def split(
    dedup_in: Input[Dataset],
    split_out: Output[Dataset],
    ratios: str = "8,1,1",
    seed: int = 0,
    options: list = [],  # noqa: B006
):
    """Stratified, cluster-aware train/val/test split of the cleaned manifest."""
    from kaedama import cli

    args = ["split", dedup_in.path, "--out", split_out.path, "--ratios", ratios]
    args += ["--seed", str(seed)]
    for item in options:
        args += ["--set", str(item)]
    if cli.main(args) != 0:
        raise RuntimeError(f"kaedama {' '.join(args)} failed")


def train(
    split_in: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    model_name: str = "tf_efficientnet_lite0",
    epochs: int = 10,
    img_size: int = 0,
    pretrained: bool = True,
    gpus: int = 0,
    nodes: int = 1,
    namespace: str = "",
    image: str = "",
    options: list = [],  # noqa: B006
) -> float:
    """Fine-tune; one node runs here (torchrun for several GPUs), several as a TrainJob.

    Returns the best validation accuracy; ``metrics`` gets the run's figures (and, for a
    TrainJob, its status as it went).
    """
    import json
    import os
    import subprocess
    import sys

    from kaedama.train.launch import TrainLaunch, launch_trainjob

    stage = ["--model", model_name, "--epochs", str(epochs), "--img-size", str(img_size)]
    stage += ["--pretrained"] if pretrained else ["--no-pretrained"]
    for item in options:
        stage += ["--set", str(item)]
    manifest = os.path.join(split_in.path, "manifest.jsonl")
    if nodes > 1:
        job = TrainLaunch(
            manifest=split_in.uri.rstrip("/") + "/manifest.jsonl",
            out=model.uri,
            args=tuple(stage),
            image=image,
            nodes=nodes,
            gpus_per_node=gpus,
            namespace=namespace,
        )
        result = launch_trainjob(job, on_status=lambda k, v: metrics.log_metric(k, v))
    else:
        if gpus > 1:
            # One process per GPU; ranks agree on steps and stop signals (kaedama.train).
            cmd = ["torchrun", f"--nproc_per_node={gpus}", "-m", "kaedama.train"]
        else:
            cmd = [sys.executable, "-m", "kaedama.train"]
        subprocess.run([*cmd, manifest, "--out", model.path, *stage], check=True)
        with open(os.path.join(model.path, "result.json"), encoding="utf-8") as fh:
            result = json.load(fh)
    for key in ("best_val_acc", "test_acc", "best_epoch", "seconds"):
        if isinstance(result.get(key), (int, float)):
            metrics.log_metric(key, float(result[key]))
    model.metadata["model_name"] = model_name
    return float(result.get("best_val_acc") or 0.0)


def evaluate(
    model: Input[Model],
    split_in: Input[Dataset],
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    champion_metrics: str = "",
    min_accuracy: float = 0.0,
) -> NamedTuple("EvaluateOutputs", [("accuracy", float), ("promote", bool), ("reason", str)]):
    """Evaluate on the test split; decide whether the model may replace the champion.

    ``promote`` is the champion/challenger gate: with ``champion_metrics`` (the
    ``metrics.json`` of the model serving now, same test set) the new model must be
    significantly better (``kaedama evaluate --compare``); without one it must reach
    ``min_accuracy``.
    """
    import json
    import os
    import shutil
    from collections import namedtuple

    from kaedama import cli, storage
    from kaedama.evaluate.metrics import log_kfp

    args = ["evaluate", model.path, split_in.path, "--split", "test", "--out", evaluation.path]
    args += ["--fit-temperature"]  # calibrated probabilities for serving (export reads it)
    if champion_metrics and storage.exists(champion_metrics):
        args += ["--compare", champion_metrics]
    if cli.main(args) != 0:
        raise RuntimeError(f"kaedama {' '.join(args)} failed")
    with open(os.path.join(evaluation.path, "kfp.json"), encoding="utf-8") as fh:
        kfp = json.load(fh)
    log_kfp(kfp, confusion, metrics)
    os.makedirs(os.path.dirname(report.path) or ".", exist_ok=True)
    shutil.copyfile(os.path.join(evaluation.path, "report.html"), report.path)
    accuracy = float(kfp["metrics"]["accuracy"])
    compare = os.path.join(evaluation.path, "compare.json")
    if os.path.exists(compare):
        with open(compare, encoding="utf-8") as fh:
            comparison = json.load(fh)
        promote = comparison["better"] == "this" and bool(comparison["significant"])
        reason = comparison["verdict"]
    else:
        promote = accuracy >= min_accuracy
        reason = f"no champion; accuracy {accuracy:.4f} vs minimum {min_accuracy:.4f}"
    out = namedtuple("EvaluateOutputs", ["accuracy", "promote", "reason"])
    return out(accuracy, promote, reason)


def export(model: Input[Model], exported: Output[Model], evaluation: Input[Dataset]):
    """Export the best checkpoint for serving (ONNX, with its data config and temperature)."""
    import os

    from kaedama import cli

    args = ["export", os.path.join(model.path, "best.pt"), "--out", exported.path]
    temperature = os.path.join(evaluation.path, "temperature.json")
    if os.path.exists(temperature):  # fitted on the val split by evaluate
        args += ["--calibration", temperature]
    if cli.main(args) != 0:
        raise RuntimeError(f"kaedama {' '.join(args)} failed")


def deploy(
    exported: Input[Model],
    mode: str = "kserve",
    namespace: str = "kaedama",
    name: str = "kaedama",
    timeout: int = 600,
) -> str:
    """Create or patch the prediction service, wait for Ready, smoke-test; roll back on failure."""
    from kaedama import cli

    args = ["deploy", exported.uri, "--mode", mode, "--namespace", namespace]
    args += ["--name", name, "--timeout", str(timeout)]
    if cli.main(args) != 0:
        raise RuntimeError(f"kaedama {' '.join(args)} failed; the previous version still serves")
    return f"{name}.{namespace}"


# Stage -> (component function, runs in the training image).
STAGES = {
    "dedup": (dedup, False),
    "split": (split, False),
    "train": (train, True),
    "evaluate": (evaluate, True),
    "export": (export, True),
    "deploy": (deploy, False),
}


def build(image: str = DEFAULT_IMAGE, train_image: str = DEFAULT_TRAIN_IMAGE) -> SimpleNamespace:
    """The components: light steps in ``image`` (the kaedama job image), torch steps in
    ``train_image``; both hold kfp, so nothing is installed when a task starts."""
    return SimpleNamespace(
        **{
            name: dsl.component(
                func, base_image=train_image if heavy else image, install_kfp_package=False
            )
            for name, (func, heavy) in STAGES.items()
        }
    )
