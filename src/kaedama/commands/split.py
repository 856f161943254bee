"""``kaedama split MANIFEST --out DST``: split a cleaned manifest into train/val/test.

Writes ``DST/manifest.jsonl`` (the input rows with ``split`` filled in) and
``DST/split_summary.json`` (counts per label per split, targets, the leakage
report and warnings), and prints the per-label table. DST may be a local folder
or a ``gs://bucket/prefix``.
"""

from __future__ import annotations

import argparse
import json
import sys

from kaedama import storage
from kaedama.config import add_stage_arguments, config_from_args
from kaedama.manifest import (
    MANIFEST_NAME,
    Manifest,
    read_manifest,
    resolve_manifest,
    write_manifest,
)
from kaedama.split import SplitConfig, format_table, read_similarity, split_rows

HELP = (
    "Split a cleaned manifest into train/val/test: stratified, cluster-aware, stable as data grows."
)
SUMMARY_NAME = "split_summary.json"
# The leakage report can be long; the terminal gets the first few, the summary has all.
MAX_PRINTED_LEAKS = 20


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the split stage's arguments and one flag per :class:`SplitConfig` field."""
    parser.add_argument(
        "manifest",
        metavar="MANIFEST",
        help="the dedup job's manifest (a .jsonl file, or a folder holding manifest.jsonl)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DST",
        help=f"output folder (local or gs://) for {MANIFEST_NAME} and {SUMMARY_NAME}",
    )
    parser.add_argument(
        "--previous",
        metavar="M",
        help="the last dataset version's split manifest: its rows keep their split and "
        "new rows fill each label's deficit",
    )
    parser.add_argument(
        "--reference",
        metavar="M",
        action="append",
        default=[],
        help="an earlier manifest (e.g. a frozen test set); new images that duplicate its test "
        "images are forced into test or dropped (repeat for several)",
    )
    add_stage_arguments(parser, SplitConfig)


def _read(uri: str) -> Manifest:
    return read_manifest(resolve_manifest(uri))


def run(args: argparse.Namespace) -> int:
    """Read, split, write, and print the per-label table; warnings go to stderr."""
    config = config_from_args(SplitConfig, args)
    manifest = _read(args.manifest)
    previous = _read(args.previous) if args.previous else None
    references = {uri: _read(uri) for uri in args.reference}
    # Confirming a phash match reads both images, as the dedup stage did.
    similarity = read_similarity(manifest.header) if references and config.confirm else None
    result = split_rows(
        manifest, config, previous=previous, references=references, similarity=similarity
    )
    header = {**result.header, "stage": "split"}
    header["split"] = {
        **header["split"],
        "input": args.manifest,
        "previous": args.previous or "",
        "references": list(args.reference),
    }
    summary = {**result.summary, "input": args.manifest, "previous_manifest": args.previous or ""}
    out_manifest = storage.join(args.out, MANIFEST_NAME)
    out_summary = storage.join(args.out, SUMMARY_NAME)
    write_manifest(out_manifest, result.rows, header)
    storage.write_text(out_summary, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    print(format_table(summary))
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    leaks = [e for e in summary["leakage"] if e["match"] in ("exact", "near")]
    for entry in leaks[:MAX_PRINTED_LEAKS]:
        print(
            f"leak: {entry['uri']} {entry['match']}-duplicates {entry['reference_uri']} "
            f"(distance {entry['distance']}) -> {entry['action']}",
            file=sys.stderr,
        )
    if len(leaks) > MAX_PRINTED_LEAKS:
        print(f"leak: ... {len(leaks) - MAX_PRINTED_LEAKS} more in {out_summary}", file=sys.stderr)
    if summary["unconfirmed_near_matches"]:
        print(
            f"note: {len(summary['unconfirmed_near_matches'])} phash match(es) with reference "
            "test images were not confirmed by the thumbnail correlation and stay where they "
            f"are (listed in {out_summary})",
            file=sys.stderr,
        )
    print(f"wrote {out_manifest} and {out_summary}")
    return 0
