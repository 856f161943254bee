"""The training TrainJob manifests: kustomize builds, valid against the Trainer CRD."""

from __future__ import annotations

import jsonschema
import pytest

from tests.k8s import REPO, kustomize, validate_crd

TRAINJOB_CRD = "trainer.kubeflow.org_trainjobs.yaml"
TARGETS = [REPO / "manifests" / "base" / "train", REPO / "manifests" / "overlays" / "gpu-4"]


@pytest.mark.parametrize("target", TARGETS, ids=lambda p: p.name)
def test_trainjob_builds_and_validates(target):
    docs = kustomize(target)
    jobs = [d for d in docs if d["kind"] == "TrainJob"]
    assert len(jobs) == 1
    validate_crd(jobs[0], TRAINJOB_CRD)
    trainer = jobs[0]["spec"]["trainer"]
    # The same command a user runs locally: torchrun -m kaedama.train MANIFEST --out DST
    assert trainer["command"] == ["torchrun", "-m", "kaedama.train"]
    assert "--out" in trainer["args"]


def test_schema_check_catches_a_bad_trainjob():
    docs = kustomize(TARGETS[0])
    bad = docs[0]
    bad["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(bad, TRAINJOB_CRD)
    del bad["spec"]["runtimeRef"]
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(bad, TRAINJOB_CRD)


def test_gpu_overlay_asks_for_four_processes_and_gpus():
    job = kustomize(TARGETS[1])[0]
    trainer = job["spec"]["trainer"]
    assert trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"


@pytest.mark.parametrize("target", TARGETS, ids=lambda p: p.name)
def test_trainjob_args_are_a_valid_kaedama_train_command_line(target):
    import argparse

    from kaedama.commands import train as command

    job = kustomize(target)[0]
    parser = argparse.ArgumentParser()
    command.configure(parser)
    args = parser.parse_args(job["spec"]["trainer"]["args"])
    cfg = command.config_from_args(args)
    assert args.manifest.startswith("gs://") and args.out.startswith("gs://")
    # Preemptible pods restart the same command: it must resume, not start over.
    assert cfg.resume is True
    assert (cfg.model, cfg.pretrained) == ("resnet50", True)


def _quantity(value: str) -> float:
    """A Kubernetes binary-suffixed quantity (``8Gi``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


@pytest.mark.parametrize("target", TARGETS, ids=lambda p: p.name)
def test_dataloader_workers_get_a_bounded_memory_backed_dev_shm(target):
    job = kustomize(target)[0]
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the torch-distributed runtime's replicated job
    pod = node["template"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (container,) = pod["containers"]
    assert container["name"] == "node"  # and its trainer container
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    # RAM-backed: it counts against the pod's memory, so it must stay below the limit.
    limit = job["spec"]["trainer"]["resourcesPerNode"]["limits"]["memory"]
    assert 0 < _quantity(shm["sizeLimit"]) < _quantity(limit)
