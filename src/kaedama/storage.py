"""One storage seam for local paths and ``gs://bucket/prefix`` URIs.

Every stage reads and writes through these functions, so a dataset can live on a
laptop disk, a Kubernetes volume or Google Cloud Storage without the stage knowing.

Conventions:

* A *URI* is a plain local path (``data/photos``), a ``file://`` URI
  (``file:///data/photos``) or a GCS URI (``gs://bucket/prefix``). URIs are raw
  strings: spaces and non-ASCII characters are written as they are, never
  percent-encoded (``gs://b/三田本店/写真 1.jpg``).
* A prefix names a *folder*: ``gs://b/a`` covers ``gs://b/a/...`` and never
  ``gs://b/ab/...``.
* Local writes are atomic (temporary file in the same folder, then
  :func:`os.replace`); a GCS write is a single upload, which GCS publishes whole.
* GCS calls that fail with a transient error (HTTP 408/429/500/502/503/504, a
  reset or refused connection) are retried with exponential backoff and jitter, a
  bounded number of times (:data:`DEFAULT_RETRY`).
* ``STORAGE_EMULATOR_HOST`` (e.g. ``http://127.0.0.1:9023``) is read at call
  time: when it is set, GCS calls go to that emulator with anonymous credentials.
  Otherwise the Google application-default credentials are used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mimetypes
import os
import random
import re
import shutil
import stat as stat_module
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from kaedama.errors import KaedamaError

if TYPE_CHECKING:
    from google.cloud.storage import Client

__all__ = [
    "DEFAULT_RETRY",
    "EMULATOR_ENV",
    "FileInfo",
    "NotFoundError",
    "TooLargeError",
    "RetryPolicy",
    "StorageError",
    "copy",
    "exists",
    "is_gcs",
    "iter_files",
    "join",
    "list_files",
    "open_read",
    "parent",
    "read_bytes",
    "read_text",
    "relative_to",
    "safe_relative",
    "size",
    "split_gcs",
    "stat",
    "write_bytes",
    "write_text",
]

_LOGGER = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
"""Environment variable naming a GCS emulator (scheme included), read at call time."""

_GCS_SCHEME = "gs://"
_FILE_SCHEME = "file://"
# Project reported to an emulator, which needs one to create buckets but checks nothing.
_EMULATOR_PROJECT = "kaedama-emulator"
_LIST_PAGE_SIZE = 1000
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")


class StorageError(KaedamaError):
    """A storage operation failed; the message names the URI and what to check."""


class NotFoundError(StorageError):
    """The object, file, folder or bucket named in the message does not exist."""


class TooLargeError(StorageError):
    """A file is larger than the caller's ``max_bytes``; nothing beyond the limit was read."""

    def __init__(self, uri: str, size: int | None, limit: int):
        self.size, self.limit = size, limit
        found = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(f"{uri} holds {found}, over the limit of {limit} bytes (max_bytes)")


@dataclass(frozen=True)
class FileInfo:
    """A file's URI (in the same style as the prefix it was listed from), size and mtime.

    ``mtime`` is seconds since the epoch (a GCS object's last update time).
    """

    uri: str
    size: int
    mtime: float
    # "file", or for listings that ask for them (``special=True``): "broken_link" (a
    # symlink to nothing) or "special" (FIFO, socket, device): entries that cannot be read.
    kind: str = "file"


@dataclass(frozen=True)
class RetryPolicy:
    """How transient GCS failures are retried.

    Attempt ``n`` (0-based) that fails waits ``min(maximum, initial * 2**n)`` scaled by
    a random factor in [0.5, 1] (jitter, so parallel workers do not retry in step).

    Args:
        attempts: Total tries per operation, the first one included.
        initial: Base delay in seconds before the first retry.
        maximum: Cap on one delay in seconds.
    """

    attempts: int = 6
    initial: float = 0.25
    maximum: float = 8.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        return min(self.maximum, self.initial * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()
"""Retry policy used by every GCS call (about 8 s of waiting in all before giving up)."""


# --------------------------------------------------------------------------- URIs


def is_gcs(uri: str) -> bool:
    """Whether ``uri`` is a ``gs://`` URI."""
    return uri.startswith(_GCS_SCHEME)


def split_gcs(uri: str) -> tuple[str, str]:
    """Split ``gs://bucket/name`` into ``("bucket", "name")``; ``name`` may be empty.

    Raises:
        StorageError: ``uri`` is not a ``gs://`` URI or has no bucket name.
    """
    if not is_gcs(uri):
        raise StorageError(f"not a gs:// URI: {uri!r}")
    bucket, _, name = uri[len(_GCS_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write it as gs://BUCKET/PREFIX")
    return bucket, name


def _local_path(uri: str) -> str:
    """The filesystem path for a plain path or ``file://`` URI (no percent-decoding)."""
    return uri[len(_FILE_SCHEME) :] if uri.startswith(_FILE_SCHEME) else uri


def _local_uri(path: str, like: str) -> str:
    """``path`` written in the style of ``like``: ``file://`` URI or plain path."""
    return _FILE_SCHEME + path if like.startswith(_FILE_SCHEME) else path


def join(base: str, *parts: str) -> str:
    """Join path segments onto a local path or URI with ``/``.

    Leading and trailing slashes of ``parts`` are dropped, so a part never replaces
    ``base`` the way :func:`os.path.join` does with an absolute part.
    """
    out = base
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        if out.endswith("/") or (is_gcs(out) and out == _GCS_SCHEME):
            out = out + part
        elif out == "":
            out = part
        else:
            out = out + "/" + part
    return out


def safe_relative(rel: str) -> str:
    """A relative path that cannot leave the folder it is joined to, on any file system.

    For names that come from data (labels, object names): ``/`` and ``\\`` both split
    segments; empty and ``.`` segments are dropped; ``..`` and ``:`` (drive letters,
    NTFS streams) are percent-encoded, so ``../../etc`` becomes ``%2E%2E/%2E%2E/etc``
    and ``C:\\x`` becomes ``C%3A/x``: still readable, never a step outside.

    Raises:
        StorageError: nothing is left of ``rel``.
    """
    parts = []
    for seg in re.split(r"[\\/]+", rel):
        if seg in ("", "."):
            continue
        seg = "%2E%2E" if seg == ".." else seg.replace(":", "%3A")
        parts.append(seg)
    if not parts:
        raise StorageError(f"{rel!r} names no file")
    return "/".join(parts)


def parent(uri: str) -> str:
    """The folder that contains ``uri`` (``gs://b/a/x.jpg`` -> ``gs://b/a``)."""
    stripped = uri.rstrip("/")
    if is_gcs(stripped):
        bucket, name = split_gcs(stripped)
        head = name.rpartition("/")[0]
        return f"{_GCS_SCHEME}{bucket}/{head}" if head else f"{_GCS_SCHEME}{bucket}"
    path = os.path.dirname(_local_path(stripped))
    return _local_uri(path, uri)


def relative_to(uri: str, base: str) -> str:
    """The part of ``uri`` below the folder ``base``, with ``/`` separators.

    ``relative_to("gs://b/data/cat/1.jpg", "gs://b/data")`` is ``"cat/1.jpg"``. Local
    paths are compared as absolute, normalised paths, so ``file://`` and plain forms mix.

    Raises:
        StorageError: ``uri`` is not below ``base``.
    """
    if is_gcs(uri) or is_gcs(base):
        if not (is_gcs(uri) and is_gcs(base)):
            raise StorageError(f"{uri!r} is not under {base!r}: one is gs://, the other is not")
        folder = base.rstrip("/") + "/"
        if base.rstrip("/") == _GCS_SCHEME.rstrip("/") or not uri.startswith(folder):
            raise StorageError(f"{uri!r} is not under {base!r}")
        rel = uri[len(folder) :]
    else:
        path = os.path.abspath(_local_path(uri))
        root = os.path.abspath(_local_path(base))
        folder = root if root.endswith(os.sep) else root + os.sep
        if not path.startswith(folder):
            raise StorageError(f"{uri!r} is not under {base!r}")
        rel = path[len(folder) :].replace(os.sep, "/")
    if not rel:
        raise StorageError(f"{uri!r} is the folder {base!r} itself, not a file under it")
    return rel


# --------------------------------------------------------------------------- GCS client

_clients: dict[tuple[int, str | None], Client] = {}
_clients_lock = threading.Lock()


def _emulator_host() -> str | None:
    return os.environ.get(EMULATOR_ENV) or None


def _client() -> Client:
    """The GCS client for this process and the current emulator setting.

    Created lazily and cached per (process id, emulator host): a forked worker (a
    DataLoader, a Beam worker) gets its own client instead of sharing sockets.
    """
    host = _emulator_host()
    key = (os.getpid(), host)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = _make_client(host)
    return client


def _make_client(host: str | None) -> Client:
    from google.cloud import storage

    if host:
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT") or _EMULATOR_PROJECT
        return storage.Client(
            project=project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": host},
        )
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return storage.Client()
    except DefaultCredentialsError as err:
        raise StorageError(
            "no Google Cloud credentials found for gs:// access: run "
            "`gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
            f"to a service-account key file, or set {EMULATOR_ENV} to use an emulator"
        ) from err


@functools.cache
def _error_types() -> dict[str, tuple[type[BaseException], ...]]:
    """Exception classes of the Google client stack, imported on first GCS use."""
    import requests
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth
    from google.cloud.storage import exceptions as gcs

    return {
        "not_found": (api.NotFound,),
        "denied": (api.Forbidden, api.Unauthorized),
        "api": (api.GoogleAPICallError,),
        "invalid_response": (gcs.InvalidResponse,),
        "transient": (
            requests.exceptions.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.Timeout,
            ConnectionError,
            auth.TransportError,
            gcs.DataCorruption,
        ),
    }


def _is_transient(err: BaseException) -> bool:
    types = _error_types()
    if isinstance(err, types["transient"]):
        return True
    if isinstance(err, types["api"]):  # 408 has no class of its own, so go by the code
        return getattr(err, "code", None) in _TRANSIENT_STATUS
    if isinstance(err, types["invalid_response"]):
        status = getattr(getattr(err, "response", None), "status_code", None)
        return status in _TRANSIENT_STATUS
    return False


def _bucket_exists(bucket: str) -> bool:
    return (
        _retrying(lambda: _client().lookup_bucket(bucket, retry=None), f"gs://{bucket}") is not None
    )


def _not_found(uri: str, what: str = "object") -> NotFoundError:
    """A NotFoundError that says whether the bucket or only the object is missing."""
    bucket, _ = split_gcs(uri)
    if not _bucket_exists(bucket):
        return NotFoundError(
            f"bucket gs://{bucket} does not exist (while accessing {uri}); "
            "check the bucket name and project"
        )
    return NotFoundError(f"{what} {uri} does not exist")


def _retrying(fn: Callable[[], T], uri: str, policy: RetryPolicy | None = None) -> T:
    """Run one GCS operation, retrying transient failures; map errors to StorageError.

    A NotFound from the API is re-raised unchanged for the caller to word; access and
    other API errors become StorageError naming ``uri``.
    """
    policy = policy or DEFAULT_RETRY
    types = _error_types()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except types["not_found"]:
            raise
        except types["denied"] as err:
            raise StorageError(
                f"access to {uri} was denied ({err}); check the credentials and that the "
                "account may read/write the bucket"
            ) from err
        except (*types["transient"], *types["invalid_response"], *types["api"]) as err:
            if not _is_transient(err):
                raise StorageError(f"GCS request for {uri} failed: {err}") from err
            if attempt + 1 >= policy.attempts:
                raise StorageError(
                    f"GCS request for {uri} still failing after {policy.attempts} attempts: "
                    f"{err}; check the network and GCS status, then re-run"
                ) from err
            wait = policy.delay(attempt)
            _LOGGER.warning(
                "transient GCS error on %s (attempt %d/%d), retrying in %.2fs: %s",
                uri,
                attempt + 1,
                policy.attempts,
                wait,
                err,
            )
            time.sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover


def _gcs_call(fn: Callable[[], T], uri: str, what: str = "object") -> T:
    """:func:`_retrying`, with NotFound turned into a NotFoundError naming ``uri``."""
    try:
        return _retrying(fn, uri)
    except _error_types()["not_found"] as err:
        raise _not_found(uri, what) from err


def _blob_name(uri: str) -> tuple[str, str]:
    bucket, name = split_gcs(uri)
    if not name or name.endswith("/"):
        raise StorageError(f"{uri!r} names a folder, not an object")
    return bucket, name


def _mtime(blob) -> float:
    updated = blob.updated
    return updated.timestamp() if updated is not None else 0.0


def _folder_prefix(name: str) -> str:
    """Object-name prefix that selects the folder ``name`` (``"a"`` -> ``"a/"``)."""
    name = name.strip("/")
    return name + "/" if name else ""


def _gcs_iter(prefix: str, recursive: bool) -> Iterator[FileInfo]:
    bucket, name = split_gcs(prefix)
    folder = _folder_prefix(name)
    token: str | None = None
    first = True
    while first or token:
        first = False

        def page(token=token):
            iterator = _client().list_blobs(
                bucket,
                prefix=folder or None,
                delimiter=None if recursive else "/",
                page_token=token,
                page_size=_LIST_PAGE_SIZE,
                retry=None,
            )
            blobs = list(next(iterator.pages, []))
            return blobs, iterator.next_page_token

        try:
            blobs, token = _retrying(page, prefix)
        except _error_types()["not_found"] as err:
            # Listing an existing bucket never 404s, so this is always the bucket.
            raise NotFoundError(
                f"bucket gs://{bucket} does not exist (while listing {prefix}); "
                "check the bucket name and project"
            ) from err
        for blob in blobs:
            # Zero-byte "folder" placeholders (console-made) are not files.
            if blob.name.endswith("/"):
                continue
            yield FileInfo(f"{_GCS_SCHEME}{bucket}/{blob.name}", int(blob.size or 0), _mtime(blob))


# --------------------------------------------------------------------------- local


def _local_iter(prefix: str, recursive: bool, special: bool = False) -> Iterator[FileInfo]:
    root = _local_path(prefix)
    if not os.path.isdir(root):
        if os.path.exists(root):
            raise StorageError(f"{prefix} is a file, not a folder to list")
        raise NotFoundError(f"folder {prefix} does not exist")
    seen: set[str] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop or a second link to a folder already walked
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise StorageError(f"cannot list folder {folder}: {err}") from err
        subfolders = []
        for entry in entries:
            if entry.is_dir():
                subfolders.append(entry.path)
            elif entry.is_file():
                info = entry.stat()
                yield FileInfo(_local_uri(entry.path, prefix), info.st_size, info.st_mtime)
            elif special:
                broken = entry.is_symlink() and not os.path.exists(entry.path)
                info = entry.stat(follow_symlinks=False)
                yield FileInfo(
                    _local_uri(entry.path, prefix),
                    0,
                    info.st_mtime,
                    "broken_link" if broken else "special",
                )
        if recursive:
            stack.extend(reversed(subfolders))


def _local_error(uri: str, err: OSError) -> StorageError:
    if isinstance(err, FileNotFoundError):
        return NotFoundError(f"file {uri} does not exist")
    if isinstance(err, IsADirectoryError):
        return StorageError(f"{uri} is a folder, not a file")
    if isinstance(err, PermissionError):
        return StorageError(f"permission denied for {uri}; check the file's owner and mode")
    return StorageError(f"cannot access {uri}: {err}")


def _atomic_local_write(path: str, write: Callable[[BinaryIO], None], uri: str) -> None:
    """Write a file via a temporary sibling and :func:`os.replace`, so readers never
    see a partial file and a failed write leaves no temporary file behind."""
    folder = os.path.dirname(path) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise _local_error(uri, err) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; keep an existing file's mode, else the usual 0644.
        try:
            mode = stat_module.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _local_error(uri, err) from err
        raise


# --------------------------------------------------------------------------- public API


def iter_files(prefix: str, *, recursive: bool = True, special: bool = False) -> Iterator[FileInfo]:
    """Yield every file (not folder) under the folder ``prefix`` with its size and mtime.

    Order: by object name on GCS; folder by folder, names sorted, locally. Use
    :func:`list_files` for one sorted list of URIs.

    Args:
        prefix: A local folder, ``file://`` folder or ``gs://bucket[/prefix]``.
        recursive: Include files in subfolders.
        special: Also yield local entries that are neither files nor folders (broken
            symlinks, FIFOs, sockets), with their :attr:`FileInfo.kind`, so that a
            caller can report them instead of losing them silently.

    Raises:
        NotFoundError: The bucket or local folder does not exist.
    """
    if is_gcs(prefix):
        return _gcs_iter(prefix, recursive)
    return _local_iter(prefix, recursive, special)


def list_files(prefix: str, *, recursive: bool = True) -> list[str]:
    """Sorted URIs (or paths, in the style of ``prefix``) of the files under ``prefix``.

    On GCS a prefix that matches nothing in an existing bucket gives ``[]``; a missing
    bucket or local folder raises :class:`NotFoundError`.
    """
    return sorted(info.uri for info in iter_files(prefix, recursive=recursive))


def stat(uri: str) -> FileInfo:
    """Size and modification time of one file.

    Raises:
        NotFoundError: The file, object or bucket does not exist.
    """
    if is_gcs(uri):
        bucket, name = _blob_name(uri)
        blob = _gcs_call(lambda: _client().bucket(bucket).get_blob(name, retry=None), uri)
        if blob is None:
            raise _not_found(uri)
        return FileInfo(uri, int(blob.size or 0), _mtime(blob))
    path = _local_path(uri)
    try:
        info = os.stat(path)
    except OSError as err:
        raise _local_error(uri, err) from err
    if stat_module.S_ISDIR(info.st_mode):
        raise StorageError(f"{uri} is a folder, not a file")
    return FileInfo(uri, info.st_size, info.st_mtime)


def size(uri: str) -> int:
    """Size of one file in bytes."""
    return stat(uri).size


def exists(uri: str) -> bool:
    """Whether a file, or a non-empty folder, exists at ``uri``.

    On GCS a folder exists when at least one object is under it; a missing bucket gives
    ``False``.
    """
    if not is_gcs(uri):
        return os.path.exists(_local_path(uri))
    bucket, name = split_gcs(uri)
    if name and not name.endswith("/"):
        blob = _client().bucket(bucket).blob(name)
        if _retrying(lambda: blob.exists(retry=None), uri):
            return True

    def any_under() -> bool:
        iterator = _client().list_blobs(
            bucket, prefix=_folder_prefix(name) or None, max_results=1, retry=None
        )
        return any(True for _ in iterator)

    try:
        return _retrying(any_under, uri)
    except _error_types()["not_found"]:
        return False


def read_bytes(uri: str, *, max_bytes: int = 0) -> bytes:
    """The whole content of one file.

    Args:
        uri: local path or ``gs://`` URI.
        max_bytes: when > 0, refuse a larger file without reading more than
            ``max_bytes + 1`` bytes of it (a local file's size is checked before any
            read; an object is fetched with a bounded range request), so a stray
            multi-GB video never lands in memory.

    Raises:
        NotFoundError: The file, object or bucket does not exist.
        TooLargeError: The file is larger than ``max_bytes``.
        StorageError: Not a regular file (a FIFO would block a plain read forever).
    """
    if is_gcs(uri):
        bucket, name = _blob_name(uri)
        blob = _client().bucket(bucket).blob(name)
        if max_bytes <= 0:
            return _gcs_call(lambda: blob.download_as_bytes(retry=None), uri)
        data = _gcs_call(lambda: blob.download_as_bytes(start=0, end=max_bytes, retry=None), uri)
        if len(data) > max_bytes:
            raise TooLargeError(uri, None, max_bytes)
        return data
    path = _local_path(uri)
    try:
        info = os.stat(path)
        if not stat_module.S_ISREG(info.st_mode):
            if stat_module.S_ISDIR(info.st_mode):
                raise StorageError(f"{uri} is a folder, not a file")
            raise StorageError(f"{uri} is not a regular file (a FIFO, socket or device)")
        if 0 < max_bytes < info.st_size:
            raise TooLargeError(uri, info.st_size, max_bytes)
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1) if max_bytes > 0 else handle.read()
    except OSError as err:
        raise _local_error(uri, err) from err
    if max_bytes > 0 and len(data) > max_bytes:  # grew since the stat
        raise TooLargeError(uri, None, max_bytes)
    return data


def read_text(uri: str, encoding: str = "utf-8") -> str:
    """The whole content of one text file, decoded."""
    data = read_bytes(uri)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise StorageError(f"{uri} is not valid {encoding} text: {err}") from err


def open_read(uri: str) -> BinaryIO:
    """A binary file object for reading ``uri`` in pieces (large files, streaming).

    Locally this is the open file; on GCS a reader that fetches ranges on demand
    (the object's existence is checked first, so a missing one fails here).
    """
    if is_gcs(uri):
        bucket, name = _blob_name(uri)
        blob = _gcs_call(lambda: _client().bucket(bucket).get_blob(name, retry=None), uri)
        if blob is None:
            raise _not_found(uri)
        return blob.open("rb")
    try:
        return open(_local_path(uri), "rb")  # noqa: SIM115 - the caller closes it
    except OSError as err:
        raise _local_error(uri, err) from err


def _content_type(uri: str) -> str:
    return mimetypes.guess_type(uri)[0] or "application/octet-stream"


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` as the whole content of ``uri``, atomically; create parent folders.

    Raises:
        NotFoundError: The bucket does not exist.
    """
    if is_gcs(uri):
        bucket, name = _blob_name(uri)
        blob = _client().bucket(bucket).blob(name)
        # Re-uploading the same bytes is idempotent, so retrying an upload is safe.
        _gcs_call(
            lambda: blob.upload_from_string(data, content_type=_content_type(uri), retry=None),
            uri,
        )
        return
    _atomic_local_write(_local_path(uri), lambda handle: handle.write(data), uri)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` encoded as the whole content of ``uri``, atomically."""
    write_bytes(uri, text.encode(encoding))


def copy(src: str, dst: str) -> None:
    """Copy one file between any two locations; the source is never deleted.

    GCS to GCS is a server-side copy; other pairs stream through this machine.
    The destination is written atomically, like :func:`write_bytes`.
    """
    if src == dst:
        stat(src)  # still report a missing source
        return
    if is_gcs(src) and is_gcs(dst):
        src_bucket, src_name = _blob_name(src)
        dst_bucket, dst_name = _blob_name(dst)
        client = _client()

        def server_copy():
            source = client.bucket(src_bucket)
            blob = source.blob(src_name)
            return source.copy_blob(blob, client.bucket(dst_bucket), dst_name, retry=None)

        try:
            _retrying(server_copy, dst)
        except _error_types()["not_found"] as err:
            stat(src)  # raises NotFoundError naming the source when it is the one missing
            raise _not_found(dst) from err
        return
    if is_gcs(src):
        # GCS -> local: download into the temporary sibling, then rename.
        bucket, name = _blob_name(src)
        blob = _client().bucket(bucket).blob(name)

        def download(handle: BinaryIO) -> None:
            def attempt():
                handle.seek(0)
                handle.truncate()
                blob.download_to_file(handle, retry=None)

            _gcs_call(attempt, src)

        _atomic_local_write(_local_path(dst), download, dst)
        return
    if is_gcs(dst):
        bucket, name = _blob_name(dst)
        blob = _client().bucket(bucket).blob(name)
        path = _local_path(src)
        if not os.path.isfile(path):
            stat(src)  # raises the right NotFoundError / folder error
        _gcs_call(
            lambda: blob.upload_from_filename(path, content_type=_content_type(dst), retry=None),
            dst,
        )
        return
    src_path = _local_path(src)
    try:
        with open(src_path, "rb") as source:
            _atomic_local_write(
                _local_path(dst), lambda handle: shutil.copyfileobj(source, handle), dst
            )
    except OSError as err:
        raise _local_error(src, err) from err
