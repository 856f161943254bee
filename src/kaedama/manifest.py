"""The dataset manifest: one row per image, shared by every stage.

Format: JSON Lines. The first line is a header object ``{"kaedama_manifest": {...}}``
holding the format version and anything recorded once for the whole file (the
hash recipe, the stage that wrote it). Every further line is one image::

    {"uri": "gs://b/cats/1.jpg", "label": "cats", "sha256": "...", "bytes": 1234,
     "width": 640, "height": 480, "phash": "c3a1...", "cluster": "", "status": "kept",
     "reason": "", "duplicate_of": "", "split": "train"}

A person reads it with one command (``head``, ``jq``); unknown columns are kept
on a round trip in :attr:`Row.extra`.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from kaedama import storage
from kaedama.errors import KaedamaError

FORMAT_VERSION = 1
HEADER_KEY = "kaedama_manifest"
# The file name every stage writes its manifest under, inside its output folder.
MANIFEST_NAME = "manifest.jsonl"
_MANIFEST_SUFFIXES = (".jsonl", ".json", ".ndjson")
STATUSES = ("kept", "dropped", "rejected")
SPLITS = ("train", "val", "test")
# Reasons for rows rejected when listed, before any byte is read.
NO_LABEL = "no_label"  # a file directly under an ImageFolder root, or an empty label
NOT_A_FILE = "not_a_file"  # a broken symlink, FIFO, socket or device
DUPLICATE_URI = "duplicate_uri"  # a list names this URI again (the first row counts)
# Line breaks that json.dumps(ensure_ascii=False) leaves unescaped inside strings but
# str.splitlines() (and many JSONL readers) split on: a file name may hold them.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
# AutoML Vision's import CSV: [set,]uri,label with set one of these (UNASSIGNED: any).
AUTOML_SETS = {"TRAIN": "training", "VALIDATION": "validation", "TEST": "test", "UNASSIGNED": ""}


class ManifestError(KaedamaError):
    """A manifest (or input list) row is malformed; ``line`` is 1-based where known."""

    def __init__(self, message: str, *, uri: str | None = None, line: int | None = None):
        where = uri or "manifest"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {message}")
        self.uri = uri
        self.line = line


@dataclass
class Row:
    """One image of the dataset and everything the stages decided about it."""

    uri: str
    label: str
    sha256: str = ""
    bytes: int = 0
    width: int = 0
    height: int = 0
    phash: str = ""
    cluster: str = ""
    status: str = "kept"
    reason: str = ""
    duplicate_of: str = ""
    split: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A flat dict for one JSON line: the fields, then the extra columns."""
        # Shallow on purpose: dataclasses.asdict deep-copies and dominates large writes.
        out = {name: getattr(self, name) for name in _FIELD_NAMES}
        out.update(self.extra)
        return out


_FIELDS = {f.name: f for f in fields(Row) if f.name != "extra"}
_FIELD_NAMES = tuple(_FIELDS)
_INT_FIELDS = ("bytes", "width", "height")
_REQUIRED = ("uri", "label")


@dataclass
class Manifest:
    """A header (recorded once) and the rows."""

    header: dict[str, Any]
    rows: list[Row]


def row_from_dict(data: Any, *, uri: str | None = None, line: int | None = None) -> Row:
    """Validate one decoded JSON object and turn it into a :class:`Row`."""
    if not isinstance(data, dict):
        raise ManifestError(
            f"expected a JSON object, got {type(data).__name__}", uri=uri, line=line
        )
    for name in _REQUIRED:
        value = data.get(name)
        if not isinstance(value, str) or (name == "uri" and not value):
            raise ManifestError(f"field {name!r} must be a non-empty string", uri=uri, line=line)
    known: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _FIELDS:
            extra[key] = value
            continue
        if key in _INT_FIELDS:
            if value in ("", None):
                value = 0
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ManifestError(
                    f"field {key!r} must be a non-negative integer, got {value!r}",
                    uri=uri,
                    line=line,
                )
        elif value is None:
            value = ""
        elif not isinstance(value, str):
            raise ManifestError(
                f"field {key!r} must be a string, got {value!r}", uri=uri, line=line
            )
        known[key] = value
    row = Row(**known, extra=extra)
    if row.status not in STATUSES:
        raise ManifestError(
            f"status {row.status!r} is not one of {', '.join(STATUSES)}", uri=uri, line=line
        )
    if row.split and row.split not in SPLITS:
        raise ManifestError(
            f"split {row.split!r} is not one of {', '.join(SPLITS)}", uri=uri, line=line
        )
    return row


def json_line(value: Any) -> str:
    """One JSON Lines line (no newline): unicode stays readable, line breaks stay escaped.

    ``json.dumps(ensure_ascii=False)`` writes U+2028, U+2029 and U+0085 raw; a reader
    splitting on them would cut the line. They can only occur inside strings, where
    their escaped form is equivalent JSON.
    """
    line = json.dumps(value, ensure_ascii=False)
    if any(ch in line for ch in _LINE_BREAKS):
        for raw, escaped in _LINE_BREAKS.items():
            line = line.replace(raw, escaped)
    return line


def normalize_label(label: str) -> str:
    """The NFC form of a label, so that NFC and NFD spellings of ``三田本店`` are one class."""
    return unicodedata.normalize("NFC", label)


def _iter_json_lines(text: str, uri: str | None) -> Iterator[tuple[int, Any]]:
    """(1-based line number, decoded value) for each non-blank JSON line.

    Lines end at ``\n`` only (``\r\n`` too): not at the other breaks that
    ``str.splitlines`` knows, which a raw file name inside a string may hold.
    """
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"not valid JSON ({exc.msg})", uri=uri, line=number) from exc


def parse_manifest(text: str, *, uri: str | None = None) -> Manifest:
    """Parse manifest text; every problem names its line."""
    header: dict[str, Any] = {}
    rows: list[Row] = []
    for number, data in _iter_json_lines(text, uri):
        if isinstance(data, dict) and HEADER_KEY in data:
            if rows or header:
                raise ManifestError("the header must be the first line", uri=uri, line=number)
            header = data[HEADER_KEY]
            if not isinstance(header, dict):
                raise ManifestError("the header must be an object", uri=uri, line=number)
            version = header.get("version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise ManifestError(
                    f"manifest format version {version} is not supported (this kaedama reads "
                    f"version {FORMAT_VERSION}); upgrade kaedama",
                    uri=uri,
                    line=number,
                )
            continue
        rows.append(row_from_dict(data, uri=uri, line=number))
    return Manifest(header=header, rows=rows)


def resolve_manifest(uri: str) -> str:
    """A manifest URI: ``uri`` itself, or ``uri/manifest.jsonl`` when given a stage's folder."""
    if uri.lower().endswith(_MANIFEST_SUFFIXES):
        return uri
    inner = storage.join(uri, MANIFEST_NAME)
    return inner if storage.exists(inner) else uri


def read_manifest(uri: str) -> Manifest:
    """Read and validate a JSON Lines manifest from a local path or ``gs://`` URI."""
    return parse_manifest(storage.read_text(uri), uri=uri)


def dumps_manifest(rows: Iterable[Row], header: dict[str, Any] | None = None) -> str:
    """Serialise rows (and a header) to JSON Lines text; unicode stays readable."""
    head = {"version": FORMAT_VERSION, **(header or {})}
    lines = [json.dumps({HEADER_KEY: head}, ensure_ascii=False, sort_keys=True)]
    for number, row in enumerate(rows, start=2):
        data = row.to_json()
        # The reader's rules, applied when written: a bad row fails here, naming itself,
        # not in the next stage.
        row_from_dict(data, uri="manifest being written", line=number)
        lines.append(json_line(data))
    return "\n".join(lines) + "\n"


def write_manifest(uri: str, rows: Iterable[Row], header: dict[str, Any] | None = None) -> None:
    """Write a manifest atomically (local or ``gs://``)."""
    storage.write_text(uri, dumps_manifest(rows, header))


def label_from_path(uri: str, root: str) -> str:
    """The ImageFolder label of ``uri`` under ``root``: its parent folder's name.

    Files directly in ``root`` have no label; nested folders use the innermost
    folder (``root/a/b/x.jpg`` -> ``b``), as torchvision's ImageFolder does for one level.
    """
    rel = storage.relative_to(uri, root)
    parent = posixpath.dirname(rel.replace("\\", "/"))
    return posixpath.basename(parent)


def list_image_folder(root: str) -> list[Row]:
    """One row per file under ``root`` (ImageFolder layout: label = parent folder).

    Every entry is listed, whatever its extension: images are recognised by content
    later, and a non-image is reported, not skipped here. Rows that cannot be used are
    listed as rejected with a reason, so that nothing disappears from the counts:
    files directly in ``root`` (:data:`NO_LABEL`: a ``.DS_Store`` or ``README.txt``)
    and local entries that are not files (:data:`NOT_A_FILE`: broken symlinks, FIFOs).
    ``bytes`` is the listed size; labels are NFC-normalised (the raw folder name is
    kept in ``extra["label_raw"]`` when it differs).
    """
    rows: list[Row] = []
    prefix = root.rstrip("/") + "/"
    for info in sorted(storage.iter_files(root, special=True), key=lambda i: i.uri):
        uri = info.uri
        if uri.startswith(prefix):  # as listed: the label is plain string work
            raw = posixpath.basename(posixpath.dirname(uri[len(prefix) :]))
        else:
            raw = label_from_path(uri, root)
        label = normalize_label(raw)
        row = Row(uri=uri, label=label, bytes=info.size)
        if raw != label:
            row.extra["label_raw"] = raw
        if info.kind != "file":
            row.status, row.reason = "rejected", NOT_A_FILE
            row.extra["message"] = f"{info.kind.replace('_', ' ')}: not a readable file"
        elif not label:
            row.status, row.reason = "rejected", NO_LABEL
            row.extra["message"] = "directly under the root: put images in <root>/<label>/"
        rows.append(row)
    return rows


def _iter_list_records(text: str, uri: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if uri.lower().endswith((".jsonl", ".json", ".ndjson")):
        for number, data in _iter_json_lines(text, uri):
            if not (isinstance(data, dict) and HEADER_KEY in data):
                yield number, data
        return
    reader = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    for record in reader:
        number = reader.line_num
        if not record or all(not c.strip() for c in record):
            continue
        if header is None:
            if [c.strip().lower() for c in record[:2]] == ["uri", "label"]:
                header = [c.strip() for c in record]
                continue
            header = ["uri", "label"] + [f"column{i}" for i in range(3, len(record) + 1)]
        if len(record) < 2:
            raise ManifestError("expected at least two columns: uri,label", uri=uri, line=number)
        cells = [c.strip() for c in record]
        if header[0] == "uri" and cells[0].upper() in AUTOML_SETS:
            # AutoML Vision's layout: set,uri,label; the set becomes ml_use for split.
            ml_use = AUTOML_SETS[cells[0].upper()]
            data = {"uri": cells[1], "label": cells[2] if len(cells) > 2 else ""}
            data.update(zip(header[3:], cells[4:], strict=False))
            if ml_use:
                data["ml_use"] = ml_use
            yield number, data
            continue
        yield number, dict(zip(header, cells, strict=False))


def _parent(uri: str) -> str:
    """The folder holding ``uri`` (local path or ``gs://``)."""
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def read_list(uri: str, *, base: str | None = None) -> list[Row]:
    """Rows from a CSV (``uri,label[,...]``, header optional) or JSONL list of images.

    Args:
        uri: the list file, local or ``gs://``.
        base: folder that relative URIs in the list are resolved against
            (default: the list file's folder).
    """
    text = storage.read_text(uri)
    base = base if base is not None else _parent(uri)
    rows = []
    for number, data in _iter_list_records(text, uri):
        if isinstance(data, dict) and isinstance(data.get("uri"), str) and data["uri"]:
            target = data["uri"]
            if not storage.is_gcs(target) and not posixpath.isabs(target) and "://" not in target:
                data = {**data, "uri": storage.join(base, target)}
        row = row_from_dict(data, uri=uri, line=number)
        label = normalize_label(row.label)
        if label != row.label:
            row.extra["label_raw"], row.label = row.label, label
        rows.append(row)
    return rows


def read_input(src: str) -> list[Row]:
    """Rows for a stage input: a CSV/JSONL list file, or an ImageFolder root."""
    if src.lower().endswith((".csv", ".jsonl", ".ndjson")) and not src.endswith("/"):
        return read_list(src)
    return list_image_folder(src)


def count_by(rows: Iterable[Row], *keys: str) -> dict[Any, int]:
    """Count rows by one or more attributes, e.g. ``count_by(rows, "label", "split")``."""
    out: dict[Any, int] = {}
    for row in rows:
        key = tuple(getattr(row, k) for k in keys)
        key = key[0] if len(keys) == 1 else key
        out[key] = out.get(key, 0) + 1
    return out
