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
