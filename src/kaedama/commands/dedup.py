"""``kaedama dedup SRC --out DST``: the dedup job, from the kaedama command line.

SRC is an ImageFolder root (label = parent folder) or a CSV/JSONL list of
``uri,label``; SRC and DST may be local or ``gs://``. Which engine runs:

* no ``--runner`` and local paths: the in-process engine (the job's own step
  functions in a pool of processes, no Beam: the fastest on one machine);
* no ``--runner`` and a ``gs://`` path: the Beam job on the DirectRunner, in this process;
* ``--runner NAME`` (or any Beam option): the Beam job (``beam/dedup.py``) on that
  runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, DaskRunner, ...).

Both engines write byte-identical outputs. DST receives
``manifest.jsonl``, ``clusters.jsonl``, ``candidates.jsonl``, ``rejected.jsonl``,
``summary.json``, ``report.html`` and ``cache/``; the summary table is printed.
"""

from __future__ import annotations

import argparse
import logging
import shlex

from kaedama.config import add_stage_arguments, config_from_args
from kaedama.dedup.decide import DedupConfig
from kaedama.dedup.job import DEFAULT_THUMBNAIL
from kaedama.errors import KaedamaError

HELP = (
    "Hash images, find exact and near-duplicates and label conflicts; "
    "write a manifest and a review page."
)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the dedup stage's arguments and one flag per :class:`DedupConfig` field."""
    parser.add_argument(
        "src",
        metavar="SRC",
        help="ImageFolder root (label = parent folder) or a .csv/.jsonl list of uri,label",
    )
    parser.add_argument(
        "--out", required=True, metavar="DST", help="output folder (local or gs://)"
    )
    parser.add_argument(
        "--cache",
        metavar="URI",
        help="hash cache file to reuse and update, e.g. shared by several datasets "
        "(default: DST/cache/hashes-<recipe>.npz)",
    )
    parser.add_argument(
        "--materialize",
        metavar="PREFIX",
        help="copy (never move) the kept images to PREFIX/<label>/<file>",
    )
    parser.add_argument(
        "--thumbnail-size",
        type=int,
        default=DEFAULT_THUMBNAIL,
        metavar="PX",
        help=f"review page thumbnail size (default: {DEFAULT_THUMBNAIL})",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="insist on the in-process engine (the default for local paths without "
        "--runner): the same steps without Beam, in a pool of worker processes",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="in-process engine: worker processes for hashing (default: one per core)",
    )
    beam = parser.add_argument_group("Beam runner")
    beam.add_argument(
        "--runner",
        help="run the Beam job on this runner: DirectRunner, DataflowRunner, FlinkRunner, "
        "SparkRunner, apache_beam.runners.dask.dask_runner.DaskRunner, ... (default: the "
        "in-process engine for local paths, the DirectRunner for gs:// paths)",
    )
    beam.add_argument(
        "--direct-num-workers",
        type=int,
        metavar="N",
        help="DirectRunner: parallel workers (0 = one per core)",
    )
    beam.add_argument(
        "--direct-running-mode",
        choices=["in_memory", "multi_threading", "multi_processing"],
        help="DirectRunner: how workers run (multi_processing uses several cores)",
    )
    beam.add_argument(
        "--beam-args",
        action="append",
        default=[],
        metavar="'ARGS'",
        help="more Beam pipeline options, quoted, e.g. --beam-args '--project p --region "
        "europe-west1 --temp_location gs://b/tmp --setup_file ./pyproject.toml' (repeatable)",
    )
    add_stage_arguments(parser, DedupConfig)


def pipeline_args(args: argparse.Namespace) -> list[str]:
    """The Beam options given on the command line, in Beam's own syntax."""
    out: list[str] = []
    if args.runner:
        out.append(f"--runner={args.runner}")
    if args.direct_num_workers is not None:
        out.append(f"--direct_num_workers={args.direct_num_workers}")
    if args.direct_running_mode:
        out.append(f"--direct_running_mode={args.direct_running_mode}")
    for chunk in args.beam_args:
        out.extend(shlex.split(chunk))
    return out


def _run_beam_job(paths, config: DedupConfig, beam_options: list[str], *, verbose: bool) -> dict:
    """Run the Beam job (imported only here: --in-process never loads Beam)."""
    try:
        # The job lives in the deployable layer.
        from beam.dedup import run_job
    except ModuleNotFoundError as exc:
        raise KaedamaError(
            f"the dedup job needs Apache Beam and kaedama's beam package ({exc}); "
            "install kaedama with the 'beam' extra: pip install 'kaedama[beam]', or run "
            "--in-process for local folders"
        ) from exc
    if not verbose:
        # Beam logs every string type hint and runner detail at INFO.
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
    return run_job(paths, config, beam_options)


def choose_engine(paths, beam_options: list[str], in_process: bool) -> str:
    """``"local"`` (the in-process engine) or ``"beam"``; see the module docstring."""
    from kaedama.dedup.job import is_local

    if in_process:
        if beam_options:
            raise KaedamaError("--in-process runs without Beam; drop the Beam runner options")
        return "local"
    if beam_options:
        return "beam"
    local = all(is_local(u) for u in (paths.input, paths.output, paths.cache, paths.materialize))
    return "local" if local else "beam"


def run(args: argparse.Namespace) -> int:
    """Run the dedup job on the engine :func:`choose_engine` picks; print the summary."""
    config = config_from_args(DedupConfig, args)
    from kaedama.dedup.job import JobPaths, default_cache_uri, run_in_process
    from kaedama.dedup.review import format_summary

    paths = JobPaths(
        input=args.src,
        output=args.out,
        cache=args.cache or default_cache_uri(args.out, config),
        materialize=args.materialize or "",
        thumbnail_size=args.thumbnail_size,
    )
    beam_options = pipeline_args(args)
    if choose_engine(paths, beam_options, args.in_process) == "local":
        summary = run_in_process(paths, config, workers=args.workers)
    else:
        summary = _run_beam_job(
            paths, config, beam_options, verbose=getattr(args, "verbose", False)
        )
    print(format_summary(summary))
    print(f"\nmanifest, clusters and review page: {args.out}")
    return 0
