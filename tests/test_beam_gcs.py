"""Beam's gs:// filesystem against the GCS emulator, interoperating with kaedama.storage."""

from __future__ import annotations

import pytest

pytest.importorskip("apache_beam")

import apache_beam as beam  # noqa: E402
from apache_beam.io import fileio  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.testing import test_pipeline as beam_testing  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from beam.gcs import use_emulator_if_configured  # noqa: E402
from kaedama import storage  # noqa: E402

UNICODE_NAME = "三田本店/写真 1.jpg"


@pytest.fixture
def beam_bucket(gcs_bucket):
    """A fresh bucket, with Beam's gs:// I/O pointed at the emulator the way jobs do it."""
    assert use_emulator_if_configured() is True
    return gcs_bucket


def test_workaround_is_inert_without_emulator(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert use_emulator_if_configured() is False


def test_match_and_open(beam_bucket):
    files = {
        f"in/{UNICODE_NAME}": b"\xff\xd8 unicode",
        "in/with space/a b.txt": b"spaces",
        "in/plain.bin": bytes(range(200)),
    }
    for name, data in files.items():
        storage.write_bytes(f"{beam_bucket}/{name}", data)
    storage.write_bytes(f"{beam_bucket}/input-other/x", b"not matched")

    [result] = FileSystems.match([f"{beam_bucket}/in/**"])
    found = {m.path: m.size_in_bytes for m in result.metadata_list}
    assert found == {f"{beam_bucket}/{n}": len(d) for n, d in files.items()}
    for name, data in files.items():
        with FileSystems.open(f"{beam_bucket}/{name}") as handle:
            assert handle.read() == data
    assert FileSystems.exists(f"{beam_bucket}/{UNICODE_NAME}") is False
    assert FileSystems.exists(f"{beam_bucket}/in/{UNICODE_NAME}") is True


def test_beam_writes_kaedama_reads(beam_bucket):
    uri = f"{beam_bucket}/out/{UNICODE_NAME}"
    with FileSystems.create(uri) as handle:
        handle.write(b"written by beam")
    assert storage.read_bytes(uri) == b"written by beam"
    assert storage.list_files(f"{beam_bucket}/out") == [uri]


def test_write_to_text_and_match_files_pipeline(beam_bucket):
    lines = [f"line {i} 写真" for i in range(50)]
    with beam_testing.TestPipeline() as p:
        _ = (
            p
            | beam.Create(lines)
            | beam.io.WriteToText(f"{beam_bucket}/text/part", file_name_suffix=".txt")
        )
    written = storage.list_files(f"{beam_bucket}/text")
    assert written, "WriteToText produced no files"
    assert all(uri.endswith(".txt") for uri in written)
    read_back = [line for uri in written for line in storage.read_text(uri).splitlines()]
    assert sorted(read_back) == sorted(lines)
    # Beam's temporary folder is gone: only the final shards remain.
    assert storage.list_files(beam_bucket) == written

    expected = [(uri, storage.read_bytes(uri)) for uri in written]
    with beam_testing.TestPipeline() as p:
        contents = (
            p
            | fileio.MatchFiles(f"{beam_bucket}/text/*.txt")
            | fileio.ReadMatches()
            | beam.Map(lambda f: (f.metadata.path, f.read()))
        )
        assert_that(contents, equal_to(expected))
