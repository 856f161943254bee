"""``kaedama predict URL FILES...``: classify images with a running service.

Retries with backoff and jitter, honours Retry-After, keeps a retry budget and an
overall deadline (see :mod:`kaedama.client`). A folder among FILES means every
file under it. Results come in input order; a failed file is reported and the
others continue; the exit status is 1 when any file failed::

    kaedama predict http://localhost:8080 photos/*.jpg --top-k 3
    kaedama predict http://localhost:8080 photos/ --json --concurrency 16 > predictions.jsonl
    kaedama predict http://localhost:8080 clip.mp4 --every 5 --concurrency 300

A video (``.mp4``, ``.mov``, ``.webm``, ...) is cut into frames (every ``--every``-th)
that are sent at once, as one burst: the results come per frame, in order
(``clip.mp4#frame=000120``), then a summary of frames, successes, retries and time.
"""

from __future__ import annotations

import argparse
import json
import sys

from kaedama.config import add_stage_arguments, config_from_args

HELP = "Call a prediction service with retry, backoff and jitter; print all class probabilities."


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the predict stage's arguments and one flag per :class:`ClientConfig` field."""
    from kaedama.client import ClientConfig

    parser.add_argument("url", metavar="URL", help="the service, e.g. http://localhost:8080")
    parser.add_argument(
        "files", metavar="FILES", nargs="+", help="image files, folders or gs:// URIs"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar"
    )
    parser.add_argument(
        "--every",
        type=int,
        default=1,
        metavar="N",
        help="videos: send every N-th frame (default: every frame)",
    )
    add_stage_arguments(parser, ClientConfig)


def _expand(items: list[str]) -> list[str]:
    import os

    from kaedama import storage

    out = []
    for item in items:
        folder = item.endswith("/") if storage.is_gcs(item) else os.path.isdir(item)
        if folder:
            out.extend(sorted(storage.list_files(item)))
        else:
            out.append(item)
    return out


def _sources(files: list[str], every: int) -> tuple[list, int]:
    """Images as they are and videos as ``(name, jpeg)`` frames; and how many frames."""
    from kaedama.video import is_video, iter_frames

    sources: list = []
    frames = 0
    for uri in files:
        if not is_video(uri):
            sources.append(uri)
            continue
        for frame in iter_frames(uri, every=every):
            sources.append((frame.name(uri), frame.jpeg))
            frames += 1
    return sources, frames


def run(args: argparse.Namespace) -> int:
    """Classify every file (and video frame) and print the results in input order."""
    import time

    from kaedama.client import Client, ClientConfig, PredictError

    config = config_from_args(ClientConfig, args)
    sources, frames = _sources(_expand(args.files), args.every)
    started = time.perf_counter()
    with Client(args.url, config) as client:
        results = client.predict_many(sources, progress=args.progress and sys.stderr.isatty())
    seconds = time.perf_counter() - started
    failed = 0
    for result in results:
        if isinstance(result, PredictError):
            failed += 1
            if args.json:
                row = {"file": result.source, "error": result.message, "status": result.status}
                print(json.dumps(row, ensure_ascii=False))
            else:
                print(f"error: {result}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            shown = ", ".join(f"{p['label']} {p['score']:.3f}" for p in result.predictions)
            print(f"{result.source}: {shown}")
    if frames:
        retries = sum(r.attempts - 1 for r in results if r.attempts)
        print(
            f"{frames} frame(s) sent at once: {len(results) - failed} answered, {failed} "
            f"failed, {retries} retries, {seconds:.1f} s",
            file=sys.stderr,
        )
    if failed:
        print(f"{failed} of {len(results)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0
