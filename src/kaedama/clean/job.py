"""The clean stage's run: read a manifest, look at each kept image once, write the results.

Steps (each a function the dedup job can call on its own):

1. :func:`scan`: per kept row, read the bytes once, compute the low-information
   statistics and, when an embedding model is given and the sha256 is not cached,
   the embedding (batched). An image that can no longer be read is rejected with the
   decoder's reason, so nothing disappears from the counts.
2. The findings (:mod:`kaedama.clean.findings`): low information, label errors,
   outliers, unwanted images.
3. :func:`kaedama.clean.decide.apply_findings`, then :func:`write_outputs`: the
   updated ``manifest.jsonl``, ``findings.jsonl`` (by step, then rank) and
   ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from kaedama import storage
from kaedama.clean.config import CleanConfig
from kaedama.clean.decide import (
    CleanError,
    Finding,
    apply_findings,
    finding_records,
    summarise,
)
from kaedama.clean.embedcache import EmbeddingCache, cache_name
from kaedama.clean.findings import (
    junk_findings,
    label_error_findings,
    low_info_findings,
    outlier_findings,
)
from kaedama.clean.lowinfo import ImageStats, image_stats
from kaedama.config import config_to_dict
from kaedama.images import ImageError
from kaedama.manifest import (
    MANIFEST_NAME,
    Row,
    json_line,
    read_manifest,
    resolve_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

FINDINGS_NAME = "findings.jsonl"
SUMMARY_NAME = "summary.json"
JUNK_MODEL_NAME = "junk_model.npz"
CACHE_FOLDER = "cache"
UNREADABLE = "unreadable"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Files read at once: hides storage latency; Pillow decodes outside the GIL.
READ_THREADS = 4


@dataclass(frozen=True)
class CleanPaths:
    """Where the stage reads and writes.

    Attributes:
        manifest: the input manifest (a dedup output folder or its manifest.jsonl).
        output: the folder for manifest.jsonl, findings.jsonl, summary.json.
        embedding_cache: the embeddings file (default: ``<output>/cache/<model>.npz``).
        unwanted: examples of unwanted images to train the junk model on: a folder (or
            prefix) of images, or a text file of URIs and/or sha256s (one a line).
        junk_model: the junk model file to apply (and, with ``unwanted``, to write;
            default ``<output>/junk_model.npz``).
    """

    manifest: str
    output: str
    embedding_cache: str = ""
    unwanted: str = ""
    junk_model: str = ""


@dataclass
class Scan:
    """What :func:`scan` learned about the kept rows."""

    stats: dict[int, ImageStats] = field(default_factory=dict)
    sha: dict[int, str] = field(default_factory=dict)
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)  # reason, message
    # Decoded for the statistics but refused by the model's preprocessing: not embedded.
    not_embedded: list[str] = field(default_factory=list)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(uri: str) -> tuple[bytes | None, str, str]:
    try:
        return storage.read_bytes(uri), "", ""
    except storage.StorageError as exc:
        return None, UNREADABLE, str(exc)


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def scan(
    rows: Sequence[Row],
    indices: Sequence[int],
    *,
    model=None,
    cache: EmbeddingCache | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> Scan:
    """Read each row once: statistics, sha256 and (on a cache miss) the embedding.

    Args:
        model: an :class:`kaedama.clean.embed.EmbeddingModel`, or None for no embeddings.
        cache: where embeddings are looked up and stored (needed with ``model``).
    """
    result = Scan()
    if model is not None:
        from kaedama.clean.embed import embed_missing
    bar = tqdm(total=len(indices), desc="clean: scan", unit="img", disable=not progress)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for chunk in _chunks(list(indices), max(batch_size, 16)):
            datas = list(pool.map(lambda i: _read(rows[i].uri), chunk))
            todo: list[tuple[str, bytes]] = []
            for i, (data, reason, message) in zip(chunk, datas, strict=True):
                if data is None:
                    result.failed[i] = (reason, message)
                    continue
                try:
                    result.stats[i] = image_stats(data, uri=rows[i].uri)
                except ImageError as exc:
                    result.failed[i] = (exc.reason, exc.message)
                    continue
                # The bytes as read now: a file changed since dedup gets its new sha256.
                result.sha[i] = sha256_hex(data)
                todo.append((result.sha[i], data))
            if model is not None:
                embed_missing(
                    model,
                    todo,
                    cache,
                    batch_size=batch_size,
                    on_error=lambda sha, exc: result.not_embedded.append(f"{sha}: {exc}"),
                )
            bar.update(len(chunk))
    bar.close()
    return result


def unwanted_examples(
    source: str, rows: Sequence[Row], model, cache: EmbeddingCache, *, batch_size: int = 32
) -> tuple[np.ndarray, set[str], dict[str, int]]:
    """Embeddings of the unwanted examples named by ``source``, their shas, and counts.

    ``source`` is a folder (every file under it) or a text file with one URI or
    sha256 a line. A sha256 is looked up in the cache, then among the manifest's rows
    (any status: a person may have dropped it already). Unreadable files and unknown
    shas are counted, not fatal.
    """
    by_sha = {r.sha256: r.uri for r in rows if r.sha256}
    uris: list[str] = []
    shas: list[str] = []
    if storage.exists(source) and not _is_folder(source):
        for line in storage.read_text(source).splitlines():
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            (shas if _SHA256.match(entry.lower()) else uris).append(entry)
    else:
        uris = sorted(storage.list_files(source))
    counts = {"listed": len(uris) + len(shas), "unreadable": 0, "unknown_sha256": 0}
    found: list[str] = []
    for sha in (s.lower() for s in shas):
        if sha in cache:
            found.append(sha)
        elif sha in by_sha:
            uris.append(by_sha[sha])
        else:
            counts["unknown_sha256"] += 1
    items = []
    for uri in uris:
        data, _, message = _read(uri)
        if data is None:
            log.warning("unwanted example %s: %s", uri, message)
            counts["unreadable"] += 1
            continue
        items.append((sha256_hex(data), data))

    def failed(sha: str, exc: Exception) -> None:
        log.warning("unwanted example %s: %s", sha[:12], exc)
        counts["unreadable"] += 1

    from kaedama.clean.embed import embed_missing

    embed_missing(model, items, cache, batch_size=batch_size, on_error=failed)
    found.extend(sha for sha, _ in items if sha in cache)
    found = sorted(set(found))
    counts["used"] = len(found)
    return cache.matrix(found), set(found), counts


def _is_folder(uri: str) -> bool:
    if storage.is_gcs(uri):
        return uri.endswith("/")
    return os.path.isdir(uri)


def _same(a: str, b: str) -> bool:
    if storage.is_gcs(a) or storage.is_gcs(b):
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def _check_paths(paths: CleanPaths, manifest_uri: str) -> None:
    out_manifest = storage.join(paths.output, MANIFEST_NAME)
    if _same(out_manifest, manifest_uri):
        raise CleanError(
            f"--out {paths.output} would overwrite the input manifest {manifest_uri}; "
            "write to another folder"
        )


def run_clean(paths: CleanPaths, config: CleanConfig, *, progress: bool = True) -> dict[str, Any]:
    """The whole stage; returns the summary as written to ``summary.json``."""
    manifest_uri = resolve_manifest(paths.manifest)
    _check_paths(paths, manifest_uri)
    manifest = read_manifest(manifest_uri)
    rows = manifest.rows
    kept = [i for i, r in enumerate(rows) if r.status == "kept"]
    needs_model = bool(config.embeddings)
    if (paths.unwanted or paths.junk_model) and not needs_model:
        raise CleanError(
            "the junk model works on embeddings: name the embedding model with --embeddings "
            "(the same one it was trained with)"
        )
    model = cache = None
    cache_uri = ""
    if needs_model:
        from kaedama.clean.embed import embedding_model

        model = embedding_model(config.embeddings, pretrained=config.pretrained)
        cache_uri = paths.embedding_cache or storage.join(
            paths.output, CACHE_FOLDER, cache_name(model.key)
        )
        cache = EmbeddingCache.load(cache_uri, model.key)
    found = scan(
        rows, kept, model=model, cache=cache, batch_size=config.batch_size, progress=progress
    )
    # Rows that can no longer be read become rejected (still counted).
    rows_now = list(rows)
    for i, (reason, message) in found.failed.items():
        rows_now[i] = replace(
            rows[i], status="rejected", reason=reason, extra={**rows[i].extra, "message": message}
        )
    for i, sha in found.sha.items():
        if rows[i].sha256 != sha:
            rows_now[i] = replace(rows_now[i], sha256=sha)
    findings: list[Finding] = []
    steps: dict[str, Any] = {}
    if config.low_info != "off":
        found_low = low_info_findings(rows_now, found.stats, config)
        findings += found_low
        steps["low_information"] = {"action": config.low_info, "scanned": len(found.stats)}
    if model is not None:
        embedded = [i for i in kept if i in found.sha and found.sha[i] in cache]
        x = cache.matrix(found.sha[i] for i in embedded)
        labels = [rows_now[i].label for i in embedded]
        if config.label_errors != "off":
            found_labels, notes = label_error_findings(embedded, x, labels, config)
            findings += found_labels
            steps["label_error"] = {"action": config.label_errors, **notes}
        if config.outliers != "off":
            found_out, scored = outlier_findings(embedded, x, labels, config)
            findings += found_out
            steps["outlier"] = {
                "action": config.outliers,
                "scored": scored,
                "z_threshold": config.outlier_z,
            }
        scored, junk_info = _junk(paths, config, rows_now, model, cache, embedded)
        if scored is not None:
            junk, scores = scored
            threshold = config.junk_threshold or junk.threshold
            findings += junk_findings(embedded, scores, threshold)
            steps["unwanted"] = {
                "action": config.junk_action,
                "threshold_used": threshold,
                **junk_info,
            }
    else:
        for kind in ("label_error", "outlier"):
            steps[kind] = {"skipped": "needs --embeddings MODEL"}
    actions = {
        "low_information": config.low_info,
        "label_error": config.label_errors,
        "outlier": config.outliers,
        "unwanted": config.junk_action,
    }
    after = apply_findings(rows_now, findings, actions)
    summary = summarise(rows, after, findings)
    summary["steps"] = steps
    summary["manifest"] = manifest_uri
    if model is not None:
        summary["embeddings"] = {
            "model": model.key,
            "cache": cache_uri,
            "hits": cache.hits,
            "misses": cache.misses,
            "embedded": cache.added,
        }
        if found.not_embedded:
            summary["embeddings"]["not_embedded"] = found.not_embedded
        cache.save(cache_uri)
    summary["config"] = config_to_dict(config)
    write_outputs(paths.output, manifest.header, after, findings, summary, config)
    return summary


def _junk(paths: CleanPaths, config: CleanConfig, rows, model, cache, embedded: Sequence[int]):
    """The junk model's scores of the ``embedded`` rows and notes; ``(None, {})`` without one.

    Trained here (``paths.unwanted``): the dataset's own rows are scored by
    cross-fitting (:func:`kaedama.clean.junk.cross_fitted_scores`), since they were the
    wanted side; the model fitted on all of them is saved for later runs. Loaded
    (``paths.junk_model``): it scores every row.
    """
    from kaedama.clean.junk import JunkModel, JunkModelError, cross_fitted_scores, train_junk_model

    x = cache.matrix(rows[i].sha256 for i in embedded)
    if paths.unwanted:
        bad, bad_shas, counts = unwanted_examples(
            paths.unwanted, rows, model, cache, batch_size=config.batch_size
        )
        good = sorted({rows[i].sha256 for i in embedded} - bad_shas)
        good_x = cache.matrix(good)
        junk = train_junk_model(bad, good_x, model.key, seed=config.seed)
        target = paths.junk_model or storage.join(paths.output, JUNK_MODEL_NAME)
        junk.save(target)
        crossed = dict(
            zip(good, cross_fitted_scores(bad, good_x, model.key, seed=config.seed), strict=True)
        )
        full = junk.scores(x)
        scores = np.array([crossed.get(rows[i].sha256, full[n]) for n, i in enumerate(embedded)])
        return (junk, scores), {"trained": target, "examples": counts, **junk.info}
    if paths.junk_model:
        junk = JunkModel.load(paths.junk_model)
        if junk.model_key != model.key:
            raise JunkModelError(
                f"{paths.junk_model} was trained on {junk.model_key} embeddings, not "
                f"{model.key}; pass the same --embeddings (and --pretrained) it was trained with"
            )
        return (junk, junk.scores(x)), {"model": paths.junk_model, **junk.info}
    return None, {}


def write_outputs(
    output: str,
    header: dict[str, Any],
    rows: Sequence[Row],
    findings: Sequence[Finding],
    summary: dict[str, Any],
    config: CleanConfig,
) -> None:
    """``manifest.jsonl`` (the input's header plus this stage's), ``findings.jsonl``, summary."""
    head = {k: v for k, v in header.items() if k != "version"}
    head.update(stage="clean", clean=config_to_dict(config))
    write_manifest(storage.join(output, MANIFEST_NAME), rows, head)
    lines = [json_line(r) for r in finding_records(rows, findings)]
    storage.write_text(storage.join(output, FINDINGS_NAME), "".join(f"{x}\n" for x in lines))
    storage.write_text(
        storage.join(output, SUMMARY_NAME),
        json.dumps(summary, ensure_ascii=False, indent=2) + "\n",
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as plain text for the terminal."""
    b, a = summary["before"], summary["after"]
    lines = [
        f"before: input {b['input']} = kept {b['kept']} + dropped {b['dropped']} + "
        f"rejected {b['rejected']}",
        f"after:  input {a['input']} = kept {a['kept']} + dropped {a['dropped']} + "
        f"rejected {a['rejected']}  ({summary['flagged_kept']} kept rows flagged for review)",
        "",
        f"{'step':<16} {'found':>6}  action",
    ]
    for kind, n in summary["found"].items():
        step = summary["steps"].get(kind, {})
        action = step.get("skipped") or step.get("action", "off")
        lines.append(f"{kind:<16} {n:>6}  {action}")
    if summary["removed_by_reason"]:
        lines.append("")
        lines.append(
            "removed: " + ", ".join(f"{k} {v}" for k, v in summary["removed_by_reason"].items())
        )
    emb = summary.get("embeddings")
    if emb:
        lines.append(
            f"embeddings: {emb['model']}: {emb['hits']} cached, {emb['embedded']} computed"
        )
    return "\n".join(lines)
