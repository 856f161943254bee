"""What a photo says about itself: EXIF capture time, camera and (opt-in) GPS in the manifest."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from kaedama import cli, images
from kaedama.dedup.decide import DedupConfig, photo_time
from kaedama.dedup.hashcache import HashCache
from kaedama.dedup.hashing import HashRecipe, ImageRecord, hash_image_bytes
from kaedama.dedup.job import record_from_tuple, record_to_tuple
from kaedama.manifest import read_manifest

TOKYO = (35.6581, 139.741333)


def photo(
    seed: int = 0,
    *,
    size=(96, 64),
    taken: str | None = None,
    offset: str | None = None,
    make: str | None = None,
    model: str | None = None,
    gps: tuple[float, float] | None = None,
    quality: int = 90,
) -> bytes:
    """A small JPEG with the given EXIF fields (absent when None)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size)
    exif = Image.Exif()
    if make is not None:
        exif[ExifTags.Base.Make] = make
    if model is not None:
        exif[ExifTags.Base.Model] = model
    sub = {}
    if taken is not None:
        sub[ExifTags.Base.DateTimeOriginal] = taken
    if offset is not None:
        sub[ExifTags.Base.OffsetTimeOriginal] = offset
    if sub:
        exif.get_ifd(ExifTags.IFD.Exif).update(sub)
    if gps is not None:
        lat, lon = gps

        def dms(v: float) -> tuple[float, float, float]:
            v = abs(v)
            d, m = int(v), int((abs(v) - int(v)) * 60)
            return (float(d), float(m), round((v - d - m / 60) * 3600, 2))

        exif.get_ifd(ExifTags.IFD.GPSInfo).update(
            {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
        )
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, exif=exif)
    return buf.getvalue()


def test_the_header_gives_capture_time_camera_and_gps():
    data = photo(
        taken="2019:05:06 07:08:09",
        offset="+09:00",
        make="Canon\x00",
        model=" EOS 5D ",
        gps=TOKYO,
    )
    exif = images.probe(data).exif
    assert exif.taken == "2019-05-06T07:08:09+09:00"
    assert (exif.make, exif.model) == ("Canon", "EOS 5D")
    assert exif.gps == pytest.approx(TOKYO, abs=1e-4)
    # the decode reads the same header: no second parse needed by the hashing
    assert images.decode_with_info(data, mode="L")[1].exif == exif
    southwest = images.probe(photo(gps=(-33.8688, -151.2093))).exif.gps
    assert southwest == pytest.approx((-33.8688, -151.2093), abs=1e-4)


def test_absent_and_invalid_fields_stay_absent():
    assert images.probe(photo()).exif == images.Exif()
    bad = images.probe(photo(taken="0000:00:00 00:00:00", offset="+99:99", make="")).exif
    assert bad == images.Exif()
    no_offset = images.probe(photo(taken="2001:02:03 04:05:06", offset="local")).exif
    assert no_offset.taken == "2001-02-03T04:05:06"
    # PNG without EXIF, and a non-JPEG decode path
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    assert images.probe(buf.getvalue()).exif == images.Exif()


def test_records_keep_gps_only_when_asked_and_cache_hits_read_the_header():
    data = photo(taken="2019:05:06 07:08:09", make="Canon", model="EOS", gps=TOKYO)
    recipe = HashRecipe()
    plain = hash_image_bytes("a.jpg", "x", data, recipe)
    assert (plain.taken, plain.make, plain.model, plain.gps) == (
        "2019-05-06T07:08:09",
        "Canon",
        "EOS",
        None,
    )
    cache = HashCache()
    first = hash_image_bytes("a.jpg", "x", data, recipe, cache=cache, keep_gps=True)
    hit = hash_image_bytes("b.jpg", "x", data, recipe, cache=cache, keep_gps=True)
    assert first.gps == pytest.approx(TOKYO, abs=1e-4)
    assert (hit.taken, hit.make, hit.gps) == (first.taken, first.make, first.gps)
    # the job's plain-value form for a runner's coders carries them too
    assert record_from_tuple(record_to_tuple(first)) == first
    assert record_from_tuple(record_to_tuple(plain)) == plain


def test_photo_time_prefers_the_capture_time():
    rec = ImageRecord("a", "x", "0" * 64, 1, 1, 1, 0, mtime=2e9)
    assert photo_time(rec) == 2e9
    assert (
        photo_time(
            ImageRecord("a", "x", "0" * 64, 1, 1, 1, 0, mtime=2e9, taken="2001-01-01T00:00:00")
        )
        == 978307200.0
    )
    tokyo = ImageRecord("a", "x", "0" * 64, 1, 1, 1, 0, taken="2001-01-01T09:00:00+09:00")
    assert photo_time(tokyo) == 978307200.0


def _manifest(out: Path) -> dict[str, dict]:
    return {Path(r.uri).name: r.to_json() for r in read_manifest(str(out / "manifest.jsonl")).rows}


def test_manifest_columns_and_oldest_keep(tmp_path):
    """Capture time and camera always; GPS only with --keep-gps; oldest by capture time."""
    src = tmp_path / "in" / "cats"
    src.mkdir(parents=True)
    # One photo and a smaller near copy of it (same pixels, lower quality) shot "earlier":
    # largest keeps the big one, oldest the one captured first, whatever the file times.
    (src / "big.jpg").write_bytes(
        photo(
            1, size=(192, 128), taken="2020:06:01 12:00:00", make="Nikon", model="D750", gps=TOKYO
        )
    )
    (src / "small.jpg").write_bytes(
        photo(1, size=(96, 64), taken="2018:06:01 12:00:00", make="Nikon", model="D750", quality=80)
    )
    (src / "plain.jpg").write_bytes(photo(7, size=(96, 64)))
    os.utime(src / "big.jpg", (1e9, 1e9))  # the file says big is older; its header disagrees
    os.utime(src / "small.jpg", (2e9, 2e9))
    common = ["--same-shot", "descriptor", "--workers", "1"]

    assert cli.main(["dedup", str(tmp_path / "in"), "--out", str(tmp_path / "a"), *common]) == 0
    rows = _manifest(tmp_path / "a")
    assert rows["big.jpg"]["taken"] == "2020-06-01T12:00:00"
    assert (rows["big.jpg"]["camera_make"], rows["big.jpg"]["camera_model"]) == ("Nikon", "D750")
    assert not any(k.startswith("gps") for r in rows.values() for k in r)
    assert not {"taken", "camera_make", "camera_model"} & set(rows["plain.jpg"])
    assert rows["big.jpg"]["status"] == "kept" and rows["small.jpg"]["status"] == "dropped"

    assert (
        cli.main(
            [
                "dedup",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "b"),
                *common,
                "--near-keep",
                "oldest",
                "--keep-gps",
            ]
        )
        == 0
    )
    rows = _manifest(tmp_path / "b")
    assert rows["small.jpg"]["status"] == "kept" and rows["big.jpg"]["status"] == "dropped"
    assert (rows["big.jpg"]["gps_latitude"], rows["big.jpg"]["gps_longitude"]) == pytest.approx(
        TOKYO, abs=1e-4
    )
    assert "gps_latitude" not in rows["small.jpg"]


def test_exact_keep_oldest_falls_back_to_the_file_time_among_identical_bytes(tmp_path):
    """Identical bytes carry identical EXIF: the capture time ties and the file time decides."""
    src = tmp_path / "in" / "cats"
    src.mkdir(parents=True)
    data = photo(3, taken="2015:01:01 00:00:00")
    for name, t in (("a.jpg", 2e9), ("b.jpg", 1e9), ("c.jpg", 1.5e9)):
        (src / name).write_bytes(data)
        os.utime(src / name, (t, t))
    out = tmp_path / "out"
    assert (
        cli.main(
            [
                "dedup",
                str(tmp_path / "in"),
                "--out",
                str(out),
                "--exact-keep",
                "oldest",
                "--same-shot",
                "descriptor",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    kept = [name for name, row in _manifest(out).items() if row["status"] == "kept"]
    assert kept == ["b.jpg"]
    assert DedupConfig(exact_keep="oldest").needs_mtime and not DedupConfig().needs_mtime
