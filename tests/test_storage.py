"""kaedama.storage on local folders and on gs:// against a real GCS emulator on loopback."""

from __future__ import annotations

import http.client
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from kaedama import storage
from kaedama.errors import KaedamaError
from tests.plugins.gcs import upload_many

UNICODE_NAME = "三田本店/写真 1.jpg"


@pytest.fixture(params=["local", "file", "gcs"])
def root(request, tmp_path) -> str:
    """The same tests over a local folder, its file:// URI and a fresh gs:// bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return "file://" + str(tmp_path / "root")
    return request.getfixturevalue("gcs_bucket") + "/root"


# --------------------------------------------------------------------------- pure URI logic


def test_is_gcs_and_split():
    assert storage.is_gcs("gs://b/x")
    assert not storage.is_gcs("/data/gs://b")
    assert storage.split_gcs("gs://b/a/x.jpg") == ("b", "a/x.jpg")
    assert storage.split_gcs("gs://b") == ("b", "")
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.split_gcs("gs:///x")


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("gs://b", ("a", "x.jpg"), "gs://b/a/x.jpg"),
        ("gs://b/", ("/a/", "x.jpg"), "gs://b/a/x.jpg"),
        ("gs://b/root", (UNICODE_NAME,), f"gs://b/root/{UNICODE_NAME}"),
        ("/data", ("/etc", "passwd"), "/data/etc/passwd"),
        ("file:///data", ("a b",), "file:///data/a b"),
        ("rel", ("x", ""), "rel/x"),
    ],
)
def test_join(base, parts, expected):
    assert storage.join(base, *parts) == expected


def test_parent():
    assert storage.parent("gs://b/a/x.jpg") == "gs://b/a"
    assert storage.parent("gs://b/x.jpg") == "gs://b"
    assert storage.parent("/data/a/x.jpg") == "/data/a"
    assert storage.parent("file:///data/a/x.jpg") == "file:///data/a"


def test_relative_to():
    assert storage.relative_to("gs://b/data/cat/1.jpg", "gs://b/data") == "cat/1.jpg"
    assert storage.relative_to("gs://b/data/cat/1.jpg", "gs://b/data/") == "cat/1.jpg"
    assert storage.relative_to("file:///d/cat/1.jpg", "/d") == "cat/1.jpg"
    with pytest.raises(storage.StorageError, match="not under"):
        storage.relative_to("gs://b/database/1.jpg", "gs://b/data")
    with pytest.raises(storage.StorageError, match="not under"):
        storage.relative_to("/d2/x", "/d")
    with pytest.raises(storage.StorageError, match="not under"):
        storage.relative_to("gs://b/d/x", "/d")


def test_errors_are_kaedama_errors():
    assert issubclass(storage.NotFoundError, storage.StorageError)
    assert issubclass(storage.StorageError, KaedamaError)


# --------------------------------------------------------------------------- parity


def test_write_read_roundtrip(root):
    files = {
        "plain.bin": bytes(range(256)) * 4,
        "nested/deeper/notes.txt": "ちいさな テキスト\n".encode(),
        UNICODE_NAME: b"\xff\xd8\xff jpeg-ish",
        "with space/a b.txt": b"spaces",
        "empty.txt": b"",
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(root, name), data)
    for name, data in files.items():
        assert storage.read_bytes(storage.join(root, name)) == data
    storage.write_text(storage.join(root, "t.txt"), "héllo\n", encoding="latin-1")
    assert storage.read_text(storage.join(root, "t.txt"), encoding="latin-1") == "héllo\n"
    assert storage.read_bytes(storage.join(root, "t.txt")) == "héllo\n".encode("latin-1")
    # Overwrite replaces the whole content.
    storage.write_text(storage.join(root, "t.txt"), "x")
    assert storage.read_text(storage.join(root, "t.txt")) == "x"
    with storage.open_read(storage.join(root, UNICODE_NAME)) as handle:
        assert handle.read() == files[UNICODE_NAME]


def test_list_files_folder_semantics(root):
    for name in ["a/x", "a/sub/y", "a/sub/deep/z", "ab/x", "top.txt", UNICODE_NAME]:
        storage.write_bytes(storage.join(root, name), name.encode())
    under_a = [storage.join(root, n) for n in ["a/sub/deep/z", "a/sub/y", "a/x"]]
    assert storage.list_files(storage.join(root, "a")) == sorted(under_a)
    assert storage.list_files(storage.join(root, "a") + "/") == sorted(under_a)
    assert storage.list_files(storage.join(root, "a"), recursive=False) == [
        storage.join(root, "a/x")
    ]
    everything = storage.list_files(root)
    assert len(everything) == 6
    assert storage.join(root, UNICODE_NAME) in everything
    assert everything == sorted(everything)
    rel = sorted(storage.relative_to(uri, root) for uri in everything)
    assert rel == sorted(["a/x", "a/sub/y", "a/sub/deep/z", "ab/x", "top.txt", UNICODE_NAME])
    assert storage.list_files(root, recursive=False) == [storage.join(root, "top.txt")]


def test_iter_files_sizes(root):
    for i in range(5):
        storage.write_bytes(storage.join(root, f"d/f{i}.bin"), b"x" * (i * 100))
    infos = {info.uri: info for info in storage.iter_files(root)}
    assert {uri: info.size for uri, info in infos.items()} == {
        storage.join(root, f"d/f{i}.bin"): i * 100 for i in range(5)
    }
    assert all(abs(info.mtime - time.time()) < 600 for info in infos.values())


def test_stat_size_exists(root):
    uri = storage.join(root, "folder", "photo 1.jpg")
    storage.write_bytes(uri, b"12345")
    info = storage.stat(uri)
    assert (info.uri, info.size) == (uri, 5)
    assert abs(info.mtime - time.time()) < 600
    assert storage.size(uri) == 5
    assert storage.exists(uri)
    assert storage.exists(storage.join(root, "folder"))
    assert not storage.exists(storage.join(root, "folder", "photo 2.jpg"))
    assert not storage.exists(storage.join(root, "fold"))


def test_missing_file_errors_name_the_uri(root):
    storage.write_bytes(storage.join(root, "present.txt"), b"x")
    missing = storage.join(root, "写真", "missing 1.jpg")
    for call in (storage.read_bytes, storage.stat, storage.size, storage.open_read):
        with pytest.raises(storage.NotFoundError) as caught:
            call(missing)
        assert missing in str(caught.value)
        assert "does not exist" in str(caught.value)
    with pytest.raises(storage.NotFoundError, match="missing 1.jpg"):
        storage.copy(missing, storage.join(root, "copy.jpg"))


def test_copy_keeps_source(root, tmp_path):
    src = storage.join(root, "src", UNICODE_NAME)
    storage.write_bytes(src, b"payload")
    dst = storage.join(root, "dst", "copy 1.jpg")
    storage.copy(src, dst)
    assert storage.read_bytes(dst) == b"payload"
    assert storage.read_bytes(src) == b"payload"
    # Across backends: out to a local folder and back in again.
    local = str(tmp_path / "out" / "x.jpg")
    storage.copy(src, local)
    assert Path(local).read_bytes() == b"payload"
    back = storage.join(root, "back", "x.jpg")
    storage.copy(local, back)
    assert storage.read_bytes(back) == b"payload"
    assert os.path.exists(local)
    storage.copy(src, src)
    assert storage.read_bytes(src) == b"payload"


# --------------------------------------------------------------------------- local only


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "manifest.jsonl"
    storage.write_text(str(target), "first\n")
    storage.write_text(str(target), "second\n")
    assert target.read_text() == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.jsonl"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    # A write that fails half-way keeps the old content and cleans its temporary file.
    with pytest.raises(TypeError):
        storage.write_bytes(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.jsonl"]


def test_local_write_keeps_existing_mode(tmp_path):
    target = tmp_path / "script.sh"
    target.write_text("old")
    target.chmod(0o750)
    storage.write_text(str(target), "new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o750


def test_local_missing_folder_and_file_as_folder(tmp_path):
    with pytest.raises(storage.NotFoundError, match="nothere"):
        storage.list_files(str(tmp_path / "nothere"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(storage.StorageError, match="not a folder"):
        storage.list_files(str(tmp_path / "f"))
    with pytest.raises(storage.StorageError, match="is a folder"):
        storage.read_bytes(str(tmp_path))


def test_local_symlink_loop_is_listed_once(tmp_path):
    (tmp_path / "d" / "cat").mkdir(parents=True)
    (tmp_path / "d" / "cat" / "1.jpg").write_bytes(b"x")
    (tmp_path / "d" / "cat" / "loop").symlink_to(tmp_path / "d")
    assert storage.list_files(str(tmp_path / "d")) == [str(tmp_path / "d" / "cat" / "1.jpg")]


# --------------------------------------------------------------------------- GCS only


def test_gcs_missing_bucket_is_an_error(gcs_emulator):
    uri = "gs://kaedama-no-such-bucket/photos"
    with pytest.raises(storage.NotFoundError, match="bucket gs://kaedama-no-such-bucket"):
        storage.list_files(uri)
    with pytest.raises(storage.NotFoundError, match="bucket gs://kaedama-no-such-bucket") as err:
        storage.read_bytes(uri + "/a.jpg")
    assert "gs://kaedama-no-such-bucket/photos/a.jpg" in str(err.value)
    with pytest.raises(storage.NotFoundError, match="bucket gs://kaedama-no-such-bucket"):
        storage.write_bytes(uri + "/a.jpg", b"x")
    with pytest.raises(storage.NotFoundError, match="bucket gs://kaedama-no-such-bucket"):
        storage.stat(uri + "/a.jpg")
    assert not storage.exists(uri + "/a.jpg")


def test_gcs_missing_object_says_object(gcs_bucket):
    with pytest.raises(storage.NotFoundError) as err:
        storage.read_bytes(gcs_bucket + "/nope.jpg")
    assert str(err.value) == f"object {gcs_bucket}/nope.jpg does not exist"
    assert storage.list_files(gcs_bucket + "/empty-prefix") == []


def test_gcs_folder_uri_is_not_an_object(gcs_bucket):
    with pytest.raises(storage.StorageError, match="names a folder"):
        storage.write_bytes(gcs_bucket + "/dir/", b"x")
    with pytest.raises(storage.StorageError, match="names a folder"):
        storage.read_bytes(gcs_bucket)


def test_gcs_listing_2000_objects(gcs_bucket):
    names = {f"many/{i % 7}/img {i:04d}.jpg": str(i).encode() for i in range(2000)}
    names["many/三田本店/写真 1.jpg"] = b"unicode"
    names["many-other/x.jpg"] = b"not under many/"
    upload_many(gcs_bucket, names)
    listed = storage.list_files(gcs_bucket + "/many")
    expected = sorted(f"{gcs_bucket}/{n}" for n in names if n.startswith("many/"))
    assert listed == expected
    assert len(listed) == 2001
    infos = list(storage.iter_files(gcs_bucket + "/many/3"))
    assert {i.uri: i.size for i in infos} == {
        f"{gcs_bucket}/{n}": len(d) for n, d in names.items() if n.startswith("many/3/")
    }


def test_gcs_folder_placeholders_are_not_files(gcs_bucket):
    upload_many(gcs_bucket, {"d/": b"", "d/cat/": b"", "d/cat/1.jpg": b"x"})
    assert storage.list_files(gcs_bucket + "/d") == [f"{gcs_bucket}/d/cat/1.jpg"]


# --------------------------------------------------------------------------- retries, for real


_OBJECT_CALL = re.compile(r"/b/[^/]+/o(/|$)")


@dataclass
class FlakyProxy:
    """An HTTP proxy on loopback in front of the emulator that fails the first requests.

    ``plan`` lists what the first object requests (listing, upload, download, metadata)
    get: an HTTP status such as ``503`` or ``"reset"`` (the TCP connection is reset with
    no response); later ones are forwarded. ``seen`` records the object requests. Bucket
    requests are always forwarded and not recorded: google-cloud-storage fetches bucket
    metadata in a background thread, at times of its own choosing.
    """

    upstream: str
    plan: list
    seen: list = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                action = "forward"
                if _OBJECT_CALL.search(path):
                    with proxy._lock:
                        action = proxy.plan.pop(0) if proxy.plan else "forward"
                        proxy.seen.append((self.command, path, action))
                if action == "reset":
                    self.wfile.close()
                    self.rfile.close()
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    return
                if action != "forward":
                    payload = b'{"error": {"code": %d, "message": "flaky"}}' % action
                    self.send_response(action)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                target = urlsplit(proxy.upstream)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

            def log_message(self, *args):
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(gcs_emulator, monkeypatch) -> Iterator:
    """Factory: route kaedama's GCS calls through a FlakyProxy with the given plan."""
    proxies = []
    # Short waits keep the test quick; the backoff logic is the production one.
    monkeypatch.setattr(storage, "DEFAULT_RETRY", storage.RetryPolicy(4, 0.01, 0.05))

    def make(plan):
        proxy = FlakyProxy(gcs_emulator, list(plan))
        proxies.append(proxy)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


def test_retry_read_after_503s(gcs_bucket, flaky):
    uri = f"{gcs_bucket}/{UNICODE_NAME}"
    storage.write_bytes(uri, b"real bytes")
    proxy = flaky([503, 503])
    assert storage.read_bytes(uri) == b"real bytes"
    assert [action for _, _, action in proxy.seen] == [503, 503, "forward"]
    assert len({path for _, path, _ in proxy.seen}) == 1  # the same download, three times


def test_retry_write_after_reset_and_429(gcs_bucket, flaky):
    uri = f"{gcs_bucket}/w/photo 1.jpg"
    proxy = flaky(["reset", 429])
    storage.write_bytes(uri, b"uploaded once")
    assert [action for _, _, action in proxy.seen] == ["reset", 429, "forward"]
    assert all(method == "POST" for method, _, _ in proxy.seen)
    assert storage.read_bytes(uri) == b"uploaded once"
    assert storage.list_files(f"{gcs_bucket}/w") == [uri]


def test_retry_listing_after_500(gcs_bucket, flaky):
    storage.write_bytes(f"{gcs_bucket}/l/a.jpg", b"a")
    proxy = flaky([500, 502])
    assert storage.list_files(f"{gcs_bucket}/l") == [f"{gcs_bucket}/l/a.jpg"]
    assert len(proxy.seen) == 3


def test_retry_gives_up_after_bounded_attempts(gcs_bucket, flaky):
    uri = f"{gcs_bucket}/x.jpg"
    storage.write_bytes(uri, b"x")
    proxy = flaky([503] * 50)
    with pytest.raises(storage.StorageError, match="after 4 attempts") as err:
        storage.read_bytes(uri)
    assert uri in str(err.value)
    assert not isinstance(err.value, storage.NotFoundError)
    assert len(proxy.seen) == 4


def test_non_transient_error_is_not_retried(gcs_bucket, flaky):
    uri = f"{gcs_bucket}/x.jpg"
    storage.write_bytes(uri, b"x")
    proxy = flaky([403])
    with pytest.raises(storage.StorageError, match="denied") as err:
        storage.read_bytes(uri)
    assert uri in str(err.value)
    assert len(proxy.seen) == 1
