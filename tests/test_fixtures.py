"""kaedama.fixtures: the folders are real digit photos and the ground truth is true."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from kaedama import cli
from kaedama.fixtures import (
    CORRUPT_KINDS,
    NEAR_KINDS,
    PHASH_RADIUS,
    PHASH_RADIUS_KINDS,
    FixturesConfig,
    FixturesError,
    GroundTruth,
    iter_files,
    make_digits_folder,
)
from kaedama.images import ImageError, decode


def phash_of(path: Path) -> imagehash.ImageHash:
    # Independent of the generator's own bookkeeping: plain PIL straight from disk.
    with Image.open(path) as img:
        return imagehash.phash(img.convert("RGB"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ink_thumbnail(image: Image.Image) -> np.ndarray:
    """Ink darkness in [0, 1] (paper and ink colours normalised away), cropped to the
    ink's bounding box (position and size normalised away), resized to 8x8."""
    grey = np.asarray(image.convert("L"), float)
    ink = (grey.max() - grey) / max(grey.max() - grey.min(), 1.0)
    ys, xs = np.nonzero(ink > 0.3)
    box = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    thumb = Image.fromarray((box * 255).astype(np.uint8)).resize((8, 8), Image.Resampling.BOX)
    return np.asarray(thumb, float) / 255


@pytest.fixture(scope="module")
def dirty_hashes(dirty_digits_folder) -> dict[str, imagehash.ImageHash]:
    root, truth = dirty_digits_folder
    return {rel: phash_of(root / rel) for rel in truth.images}


def test_every_file_is_in_the_truth_under_its_folder_label(dirty_digits_folder):
    root, truth = dirty_digits_folder
    assert list(iter_files(root)) == sorted(truth.labels)
    for rel, label in truth.labels.items():
        assert rel.split("/")[0] == label
    assert sorted(set(truth.labels.values())) == [str(d) for d in range(10)]
    config = FixturesConfig()
    assert len(truth.originals) == 10 * config.per_class
    assert len(truth.labels) == (
        10 * config.per_class
        + config.exact_duplicates
        + config.near_duplicates
        + config.cross_label
        + config.corrupt
    )


def test_originals_are_distinct_photos_of_the_right_digit(dirty_digits_folder, dirty_hashes):
    root, truth = dirty_digits_folder
    digests = {sha(root / rel) for rel in truth.originals}
    assert len(digests) == len(truth.originals)
    accidental = {frozenset(t[:2]) for t in truth.accidental_near_pairs}
    close = {
        frozenset((a, b))
        for a, b in itertools.combinations(truth.originals, 2)
        if dirty_hashes[a] - dirty_hashes[b] <= PHASH_RADIUS
    }
    assert close <= accidental
    # Real handwriting, not noise: a 1-nearest-neighbour on 8x8 thumbnails of the
    # ink's bounding box, fitted on half of the originals, labels the other half
    # far above chance (10 %).
    thumbs = {rel: ink_thumbnail(decode((root / rel).read_bytes())) for rel in truth.originals}
    train, test = truth.originals[::2], truth.originals[1::2]
    matrix = np.stack([thumbs[r].ravel() for r in train])
    correct = 0
    for rel in test:
        nearest = train[int(np.argmin(((matrix - thumbs[rel].ravel()) ** 2).sum(1)))]
        correct += truth.labels[nearest] == truth.labels[rel]
    assert correct / len(test) > 0.8


def test_exact_duplicates_have_identical_bytes_in_the_same_label(dirty_digits_folder):
    root, truth = dirty_digits_folder
    assert len(truth.exact_duplicates) == FixturesConfig().exact_duplicates
    for original, copy in truth.exact_duplicates:
        assert original != copy
        assert truth.labels[original] == truth.labels[copy]
        assert (root / original).read_bytes() == (root / copy).read_bytes()


def test_near_duplicates_are_what_their_kind_says(dirty_digits_folder, dirty_hashes):
    root, truth = dirty_digits_folder
    near = truth.near_duplicates
    assert sorted(near) == sorted(NEAR_KINDS)
    assert sum(len(v) for v in near.values()) == FixturesConfig().near_duplicates
    for kind, pairs in near.items():
        for original, copy in pairs:
            assert truth.labels[original] == truth.labels[copy]
            assert sha(root / original) != sha(root / copy)
            a, b = decode((root / original).read_bytes()), decode((root / copy).read_bytes())
            if kind == "resize":
                assert b.size == (a.width // 2, a.height // 2)
            elif kind == "crop":
                assert a.width - 8 <= b.width < a.width and a.height - 8 <= b.height < a.height
            else:
                assert b.size == a.size
            if kind == "brightness":
                gain = np.asarray(b, float).mean() / np.asarray(a, float).mean()
                assert 1.07 < gain < 1.13
            if kind == "jpeg":
                assert (root / copy).read_bytes()[:3] == b"\xff\xd8\xff"


def test_recorded_phash_distances_are_true_and_radius_kinds_stay_within(
    dirty_digits_folder, dirty_hashes
):
    _, truth = dirty_digits_folder
    for p in truth.planted:
        measured = dirty_hashes[p.original] - dirty_hashes[p.copy]
        assert measured == p.phash_distance, p
        if p.kind == "exact" or p.kind in PHASH_RADIUS_KINDS:
            assert measured <= PHASH_RADIUS, p
    # The crop copies are honest about being further away (not claimed within).
    assert "crop" not in PHASH_RADIUS_KINDS
    assert truth.duplicate_pairs(within=None) >= truth.duplicate_pairs()


def test_every_close_pair_on_disk_is_explained_by_the_truth(dirty_digits_folder, dirty_hashes):
    """Precision of the truth: no pair within the radius is left unexplained."""
    _, truth = dirty_digits_folder
    explained = truth.duplicate_pairs(within=None) | {
        frozenset(t[:2]) for t in truth.accidental_near_pairs
    }
    for cluster in truth.clusters():  # copies of one original are close to each other too
        explained |= {frozenset(pair) for pair in itertools.combinations(cluster, 2)}
    close = {
        frozenset((a, b))
        for a, b in itertools.combinations(sorted(dirty_hashes), 2)
        if dirty_hashes[a] - dirty_hashes[b] <= PHASH_RADIUS
    }
    assert close <= explained
    # And recall: every planted pair the truth claims within the radius is close.
    assert truth.duplicate_pairs() <= close


def test_cross_label_copies_sit_under_another_label(dirty_digits_folder):
    root, truth = dirty_digits_folder
    pairs = truth.cross_label_pairs
    assert len(pairs) == FixturesConfig().cross_label
    kinds = {p.kind for p in truth.planted if p.cross_label}
    assert kinds == {"exact", "jpeg"}
    for p in truth.planted:
        if p.cross_label:
            assert truth.labels[p.original] != truth.labels[p.copy]
            same_bytes = (root / p.original).read_bytes() == (root / p.copy).read_bytes()
            assert same_bytes == (p.kind == "exact")


def test_corrupt_files_get_their_exact_decoder_reason(dirty_digits_folder):
    root, truth = dirty_digits_folder
    assert sorted(truth.corrupt.values()) == sorted(CORRUPT_KINDS)
    for rel, reason in truth.corrupt.items():
        assert rel.endswith(".jpg")
        with pytest.raises(ImageError) as info:
            decode((root / rel).read_bytes())
        assert info.value.reason == reason


def test_extensionless_file_is_a_readable_jpeg_original(dirty_digits_folder):
    root, truth = dirty_digits_folder
    assert len(truth.no_extension) == 1
    rel = truth.no_extension[0]
    assert "." not in rel.split("/")[-1] and rel in truth.originals
    with Image.open(root / rel) as img:
        assert img.format == "JPEG"
    assert decode((root / rel).read_bytes()).size == (64, 64)


def test_clean_folder_has_no_dirt(digits_folder):
    files = list(iter_files(digits_folder))
    assert len(files) == 10 * 20
    assert len({sha(digits_folder / rel) for rel in files}) == len(files)
    assert all(Path(rel).suffix in (".png", ".jpg") for rel in files)
    for rel in files[::25]:
        assert decode((digits_folder / rel).read_bytes()).mode == "RGB"


def test_same_seed_same_bytes_other_seed_other_bytes(make_digits):
    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for rel in iter_files(root):
            h.update(rel.encode() + b"\0" + (root / rel).read_bytes())
        return h.hexdigest()

    small = dict(per_class=6, exact_duplicates=2, near_duplicates=4, cross_label=2, corrupt=3)
    root_a, truth_a = make_digits(**small, seed=7)
    root_b, truth_b = make_digits(**small, seed=7)
    root_c, _ = make_digits(**small, seed=8)
    assert digest(root_a) == digest(root_b)
    assert truth_a.to_dict() | {"root": ""} == truth_b.to_dict() | {"root": ""}
    assert digest(root_a) != digest(root_c)


def test_unicode_labels_and_fewer_classes(make_digits):
    root, truth = make_digits(
        classes=("三田本店", "新宿店"),
        per_class=8,
        exact_duplicates=1,
        near_duplicates=2,
        cross_label=1,
    )
    assert sorted(p.name for p in root.iterdir()) == sorted(["三田本店", "新宿店"])
    assert set(truth.labels.values()) == {"三田本店", "新宿店"}
    assert len(truth.originals) == 16


def test_ground_truth_json_round_trip(dirty_digits_folder, tmp_path):
    _, truth = dirty_digits_folder
    path = tmp_path / "truth.json"
    truth.save(path)
    again = GroundTruth.load(path)
    assert again == truth
    assert again.near_duplicates == truth.near_duplicates
    assert truth.source_of(truth.planted[0].copy) == truth.planted[0].original


def test_refuses_a_non_empty_folder_and_impossible_configs(tmp_path):
    (tmp_path / "keep.txt").write_text("someone's file")
    with pytest.raises(FixturesError, match="not an empty folder"):
        make_digits_folder(tmp_path, FixturesConfig(per_class=2).clean())
    assert (tmp_path / "keep.txt").read_text() == "someone's file"
    with pytest.raises(FixturesError, match="per_class"):
        make_digits_folder(tmp_path / "new", FixturesConfig(per_class=500).clean())
    with pytest.raises(FixturesError, match="raise per_class"):
        make_digits_folder(tmp_path / "new2", FixturesConfig(per_class=1, exact_duplicates=50))
    for bad in (
        dict(classes=tuple("abcdefghijk")),
        dict(classes=("a", "a")),
        dict(classes=("a/b",)),
        dict(near_kinds=("blur",)),
        dict(classes=("only",), cross_label=1),
        dict(jpeg_fraction=2.0),
    ):
        with pytest.raises(FixturesError):
            FixturesConfig(**bad)


def test_cli_writes_folder_and_truth_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(
        [
            "fixtures",
            str(out),
            "--classes",
            "cat,dog",
            "--per-class",
            "6",
            "--near-duplicates",
            "4",
            "--set",
            "exact_duplicates=2",
            "--set",
            "cross_label=1",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    truth = GroundTruth.load(tmp_path / "demo.truth.json")
    assert summary["files"] == len(truth.labels) == 12 + 2 + 4 + 1 + 3
    assert summary["near_duplicates"] == {"resize": 1, "jpeg": 1, "brightness": 1, "crop": 1}
    assert sorted(p.name for p in out.iterdir()) == ["cat", "dog"]
    assert truth.config["classes"] == ["cat", "dog"] and truth.config["exact_duplicates"] == 2

    assert cli.main(["fixtures", str(out)]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    assert cli.main(["fixtures", str(tmp_path / "x"), "--set", "colour=red"]) == 1
    assert "unknown FixturesConfig field 'colour'" in capsys.readouterr().err
