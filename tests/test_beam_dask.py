"""The Beam dedup job on a second real runner: Beam's DaskRunner on a dask.distributed cluster.

A ``LocalCluster`` of two worker processes stands in for a Dask cluster on
Kubernetes: elements are pickled between processes and shuffled by Dask, not by
Beam's DirectRunner. The job's outputs must equal the DirectRunner's byte for byte.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from dask.distributed import Client, LocalCluster, get_task_stream

from beam import dedup as job

DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
# Planted exact, near and cross-label copies plus corrupt files, under unicode labels.
FOLDER = {
    "classes": ("猫", "犬 dog"),
    "per_class": 8,
    "exact_duplicates": 3,
    "near_duplicates": 4,
    "cross_label": 2,
    "corrupt": 3,
    "no_extension": 1,
}


@pytest.fixture(scope="module")
def cluster():
    """Two single-threaded worker processes, no dashboard."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        yield local


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _run(base: Path, src: Path, *beam_args: str) -> dict[str, bytes]:
    """Run the job into ``base/run`` (outputs and copies), then move it aside; its files.

    Every run writes to the same paths, since outputs name them (input, cache URI,
    materialize prefix).
    """
    run = base / "run"
    summary = job.run(
        [
            "--input",
            str(src),
            "--output",
            str(run / "out"),
            "--materialize",
            str(run / "kept"),
            "--read_threads=2",
            *beam_args,
        ]
    )
    assert summary["input"] == len(_files(src))
    files = _files(run)
    shutil.rmtree(run)
    return files


def test_dask_runner_on_two_worker_processes_writes_what_the_direct_runner_writes(
    cluster, make_digits, tmp_path
):
    src, truth = make_digits(**FOLDER)
    with Client(cluster) as client, get_task_stream(client) as tasks:
        on_dask = _run(
            tmp_path,
            src,
            f"--runner={DASK_RUNNER}",
            f"--dask_client_address={cluster.scheduler_address}",
            "--branches=2",
        )
    direct = _run(tmp_path, src)
    assert sorted(on_dask) == sorted(direct)
    for name, data in direct.items():
        assert on_dask[name] == data, name
    # The run did what a dedup run must: every output, the planted copies found and
    # dropped, the kept images copied.
    names = set(direct)
    assert {"out/manifest.jsonl", "out/summary.json", "out/report.html"} <= names
    assert sum(1 for n in names if n.startswith("kept/")) < len(truth.images)
    assert any(n.startswith("kept/") for n in names)
    # Both worker processes ran the job's DoFns.
    workers = Counter(t["worker"] for t in tasks.data if "apply_dofn_to_bundle" in str(t["key"]))
    assert set(workers) == set(cluster.scheduler_info["workers"]), workers
