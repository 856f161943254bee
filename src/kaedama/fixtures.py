"""Labeled image folders with planted dirt and the exact ground truth, for tests and the demo.

The pictures are real handwriting: scikit-learn's 1,797 8x8 digits (they ship
inside the scikit-learn wheel, so nothing is downloaded), each rendered as a
small photo with its own paper colour gradient, ink colour, size, tilt and
position. Distinct samples are therefore distinct photos, and a re-render is
forced whenever a new original comes within ``min_distance`` bits of an earlier
one in 64-bit pHash, so "originals are not near-duplicates" is true by
construction and checked.

Then, with a seeded RNG, the generator plants:

* exact duplicates: the same bytes under another name in the same label;
* near-duplicates in the same label: ``resize`` (50 %), ``jpeg`` (re-encoded at
  low quality), ``brightness`` (x1.1), ``crop`` (a few pixels off each side);
* cross-label copies: an original's bytes (or a JPEG re-encode) under another label;
* corrupt files: zero bytes, a truncated JPEG, a text file named ``.jpg``;
* originals saved as a JPEG with no file extension.

:class:`GroundTruth` lists all of it, with each planted copy's measured pHash
distance to its original. ``resize``, ``jpeg`` and ``brightness`` copies stay
within :data:`PHASH_RADIUS` bits (:data:`PHASH_RADIUS_KINDS`); ``crop`` moves the
tiny digit by a few pixels and usually does not, so its copies are recorded as
near-duplicates *with* their real distance rather than claimed to be within it.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

from kaedama import images
from kaedama.errors import KaedamaError

DIGIT_NAMES = tuple(str(d) for d in range(10))
NEAR_KINDS = ("resize", "jpeg", "brightness", "crop")
PHASH_RADIUS = 4
"""The Hamming radius (64-bit pHash) that the "within" claims refer to."""
PHASH_RADIUS_KINDS = ("resize", "jpeg", "brightness")
"""Near-duplicate kinds whose copies stay within PHASH_RADIUS of their original here."""
CORRUPT_KINDS = ("empty", "truncated", "not_an_image")
"""Corrupt file kinds, each named by the :data:`kaedama.images.REASONS` value it must get."""

_JPEG_QUALITY = 92
_NEAR_JPEG_QUALITY = 35
_CROSS_KINDS = ("exact", "jpeg")
_MAX_RENDER_TRIES = 50


class FixturesError(KaedamaError):
    """The requested fixture folder cannot be generated."""


@dataclass(frozen=True)
class FixturesConfig:
    """What to generate; the ``kaedama fixtures`` flags mirror these fields."""

    classes: tuple[str, ...] = field(
        default=(),
        metadata={"help": "label names for digits 0,1,2,... (any Unicode); empty = 0..9"},
    )
    per_class: int = field(default=50, metadata={"help": "distinct original images per label"})
    size: int = field(default=64, metadata={"help": "side of the rendered square images, pixels"})
    jpeg_fraction: float = field(
        default=0.5, metadata={"help": "share of originals saved as JPEG (the rest PNG)"}
    )
    exact_duplicates: int = field(
        default=15, metadata={"help": "same-bytes copies under another name, same label"}
    )
    near_duplicates: int = field(
        default=20, metadata={"help": "transformed copies in the same label, cycling near_kinds"}
    )
    near_kinds: tuple[str, ...] = field(
        default=NEAR_KINDS, metadata={"help": f"near-duplicate transformations, of {NEAR_KINDS}"}
    )
    cross_label: int = field(
        default=6, metadata={"help": "copies of an original placed under another label"}
    )
    corrupt: int = field(
        default=3, metadata={"help": f"corrupt files, cycling {', '.join(CORRUPT_KINDS)}"}
    )
    no_extension: int = field(
        default=1, metadata={"help": "originals saved as JPEG without a file extension"}
    )
    min_distance: int = field(
        default=10, metadata={"help": "re-render an original closer than this (pHash bits)"}
    )
    seed: int = field(default=0, metadata={"help": "random seed; same seed, same bytes"})

    def __post_init__(self) -> None:
        n_classes = len(self.classes) or len(DIGIT_NAMES)
        if not 1 <= n_classes <= len(DIGIT_NAMES):
            raise FixturesError(f"between 1 and 10 classes (one per digit), got {n_classes}")
        names = self.classes or DIGIT_NAMES
        if len(set(names)) != len(names):
            raise FixturesError(f"class names must be distinct, got {list(names)}")
        for name in names:
            if not name or name in (".", "..") or "/" in name or "\\" in name:
                raise FixturesError(f"{name!r} cannot be a folder name; choose another label")
        if self.per_class < 1 or self.size < 16:
            raise FixturesError("per_class must be >= 1 and size >= 16")
        if not 0.0 <= self.jpeg_fraction <= 1.0:
            raise FixturesError(f"jpeg_fraction must be in [0, 1], got {self.jpeg_fraction}")
        unknown = set(self.near_kinds) - set(NEAR_KINDS)
        if unknown or (self.near_duplicates and not self.near_kinds):
            raise FixturesError(f"near_kinds must be a non-empty subset of {NEAR_KINDS}")
        counts = (self.exact_duplicates, self.near_duplicates, self.cross_label, self.corrupt)
        if min(*counts, self.no_extension) < 0:
            raise FixturesError("dirt counts cannot be negative")
        if self.cross_label and n_classes < 2:
            raise FixturesError("cross_label copies need at least two classes")

    @property
    def labels(self) -> tuple[str, ...]:
        """The label of digit ``d`` is ``labels[d]``."""
        return self.classes or DIGIT_NAMES

    def clean(self) -> FixturesConfig:
        """The same folder without any planted dirt."""
        return replace(
            self, exact_duplicates=0, near_duplicates=0, cross_label=0, corrupt=0, no_extension=0
        )


@dataclass(frozen=True)
class Planted:
    """A planted copy of an original.

    Attributes:
        original: relative path of the original.
        copy: relative path of the copy.
        kind: ``exact`` or one of :data:`NEAR_KINDS`.
        cross_label: the copy sits under a different label from the original.
        phash_distance: Hamming distance between the two files' 64-bit pHash
            (``imagehash.phash`` of the decoded RGB image), measured on the bytes written.
    """

    original: str
    copy: str
    kind: str
    cross_label: bool
    phash_distance: int


@dataclass
class GroundTruth:
    """Everything that was written under ``root``; paths are ``label/name``, relative to root."""

    root: str
    config: dict
    labels: dict[str, str] = field(default_factory=dict)
    originals: list[str] = field(default_factory=list)
    planted: list[Planted] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)
    no_extension: list[str] = field(default_factory=list)
    accidental_near_pairs: list[tuple[str, str, int]] = field(default_factory=list)
    """Pairs within PHASH_RADIUS that nothing planted (expected empty; recorded if not)."""

    @property
    def exact_duplicates(self) -> list[tuple[str, str]]:
        """(original, copy) pairs with identical bytes in the same label."""
        return [
            (p.original, p.copy) for p in self.planted if p.kind == "exact" and not p.cross_label
        ]

    @property
    def near_duplicates(self) -> dict[str, list[tuple[str, str]]]:
        """Same-label near-duplicate (original, copy) pairs by transformation kind."""
        out: dict[str, list[tuple[str, str]]] = {}
        for p in self.planted:
            if p.kind != "exact" and not p.cross_label:
                out.setdefault(p.kind, []).append((p.original, p.copy))
        return out

    @property
    def cross_label_pairs(self) -> list[tuple[str, str]]:
        """(original, copy) pairs where the copy carries another label."""
        return [(p.original, p.copy) for p in self.planted if p.cross_label]

    @property
    def images(self) -> list[str]:
        """Every file that decodes (all but the corrupt ones), sorted."""
        return sorted(set(self.labels) - set(self.corrupt))

    def source_of(self, relpath: str) -> str:
        """The original a file was copied from, or the file itself."""
        for p in self.planted:
            if p.copy == relpath:
                return p.original
        return relpath

    def clusters(self) -> list[list[str]]:
        """Groups of two or more files that show the same picture (original first)."""
        groups: dict[str, list[str]] = {}
        for p in self.planted:
            groups.setdefault(p.original, [p.original]).append(p.copy)
        return [groups[k] for k in sorted(groups)]

    def duplicate_pairs(
        self, *, within: int | None = PHASH_RADIUS, cross_label: bool | None = None
    ) -> set[frozenset[str]]:
        """Unordered pairs of files that show the same picture.

        Args:
            within: keep only planted copies measured within this many pHash bits
                of their original (``None``: every planted copy).
            cross_label: ``True``/``False`` to keep only cross-/same-label copies.
        """
        return {
            frozenset((p.original, p.copy))
            for p in self.planted
            if (within is None or p.phash_distance <= within)
            and (cross_label is None or p.cross_label == cross_label)
        }

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "config": self.config,
            "labels": self.labels,
            "originals": self.originals,
            "planted": [asdict(p) for p in self.planted],
            "corrupt": self.corrupt,
            "no_extension": self.no_extension,
            "accidental_near_pairs": [list(t) for t in self.accidental_near_pairs],
        }

    @classmethod
    def from_dict(cls, data: dict) -> GroundTruth:
        return cls(
            root=data["root"],
            config=data["config"],
            labels=dict(data["labels"]),
            originals=list(data["originals"]),
            planted=[Planted(**p) for p in data["planted"]],
            corrupt=dict(data["corrupt"]),
            no_extension=list(data["no_extension"]),
            accidental_near_pairs=[(a, b, int(d)) for a, b, d in data["accidental_near_pairs"]],
        )

    def save(self, path: str | Path) -> None:
        """Write the ground truth as JSON (UTF-8, labels unescaped)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), "utf-8")

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        return cls.from_dict(json.loads(Path(path).read_text("utf-8")))


# --------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is a test/demo dependency, not a core one
        raise FixturesError(
            "fixtures are rendered from scikit-learn's digits; install scikit-learn "
            "(pip install 'scikit-learn>=1.4')"
        ) from exc
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def render_digit(pixels: np.ndarray, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Render one 8x8 digit (values 0..16) as a ``size`` x ``size`` RGB photo.

    The digit is scaled up smoothly (bicubic) to 60-85 % of the frame, tilted by
    up to 10 degrees and placed at a random position, in a random dark ink on a
    light paper whose colour changes along a random direction. Paper colours stay
    in 150..230 so that a x1.1 brightness change does not clip.
    """
    ink_alpha = Image.fromarray(np.clip(pixels * (255 / 16), 0, 255).astype(np.uint8), "L")
    side = int(rng.integers(int(0.6 * size), int(0.85 * size) + 1))
    glyph = ink_alpha.resize((side, side), Image.Resampling.BICUBIC)
    glyph = glyph.rotate(float(rng.uniform(-10, 10)), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (size, size), 0)
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    canvas.paste(glyph, (x0, y0))
    alpha = np.asarray(canvas, dtype=np.float32)[..., None] / 255.0

    paper_a, paper_b = rng.uniform(150, 230, 3), rng.uniform(150, 230, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    t = np.clip(np.cos(angle) * xx + np.sin(angle) * yy + 0.5, 0, 1)[..., None]
    paper = paper_a * (1 - t) + paper_b * t
    ink = rng.uniform(0, 90, 3)
    rgb = paper * (1 - alpha) + ink * alpha
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def _save_like(image: Image.Image, ext: str) -> bytes:
    return _encode(image, "JPEG", quality=_JPEG_QUALITY) if ext == "jpg" else _encode(image, "PNG")


def _near_copy(image: Image.Image, kind: str, ext: str) -> tuple[bytes, str]:
    """Bytes and file extension of a near-duplicate of ``image``."""
    w, h = image.size
    if kind == "resize":
        return _save_like(image.resize((w // 2, h // 2), Image.Resampling.LANCZOS), ext), ext
    if kind == "jpeg":
        return _encode(image, "JPEG", quality=_NEAR_JPEG_QUALITY), "jpg"
    if kind == "brightness":
        return _save_like(ImageEnhance.Brightness(image).enhance(1.1), ext), ext
    if kind == "crop":
        margin = max(1, w // 20)
        return _save_like(image.crop((margin, margin, w - margin, h - margin)), ext), ext
    raise FixturesError(f"unknown near-duplicate kind {kind!r}; choose from {NEAR_KINDS}")


def _phash(data: bytes) -> int:
    h = imagehash.phash(images.decode(data)).hash.flatten()
    return int("".join("1" if b else "0" for b in h), 2)


def _distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass
class _File:
    label: str
    data: bytes
    ext: str  # "" for no extension
    role: str  # original / copy / corrupt
    phash: int | None = None
    name: str = ""

    def relpath(self) -> str:
        return f"{self.label}/{self.name}"


def _check_empty(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FixturesError(
            f"{root} already exists and is not an empty folder; choose a new folder or delete it "
            "(the ground truth must describe every file in it)"
        )


def make_digits_folder(
    root: str | Path, config: FixturesConfig | None = None, *, progress: bool | None = None
) -> GroundTruth:
    """Write a labeled image folder ``root/<label>/<file>`` and return its ground truth.

    Args:
        root: a local folder that does not exist yet or is empty.
        config: what to generate; the default plants some of every kind of dirt.
        progress: show a progress bar; ``None`` shows it only on a terminal.

    Returns:
        The :class:`GroundTruth`, with paths relative to ``root``.

    Raises:
        FixturesError: bad config, not enough digits, or a non-empty ``root``.
    """
    config = config or FixturesConfig()
    root = Path(root)
    _check_empty(root)
    pixels, targets = _digits()
    rng = np.random.default_rng(config.seed)
    labels = config.labels

    # Distinct samples per digit, drawn once from a seeded permutation.
    chosen: list[tuple[int, str]] = []
    spare: list[int] = []
    for digit, label in enumerate(labels):
        pool = rng.permutation(np.flatnonzero(targets == digit))
        if len(pool) < config.per_class + 1:
            raise FixturesError(
                f"digit {digit} has {len(pool)} samples; per_class must be below that"
            )
        chosen += [(int(i), label) for i in pool[: config.per_class]]
        spare += [int(i) for i in pool[config.per_class :]]

    originals: list[_File] = []
    kept_hashes: list[int] = []
    for index, label in tqdm(chosen, desc="render", unit="img", disable=_no_bar(progress)):
        ext = "jpg" if rng.random() < config.jpeg_fraction else "png"
        for _ in range(_MAX_RENDER_TRIES):
            data = _save_like(render_digit(pixels[index], rng, config.size), ext)
            h = _phash(data)
            if all(_distance(h, k) >= config.min_distance for k in kept_hashes):
                break
        # After the tries the last rendering is kept; any near pair it forms is
        # found below and recorded as accidental rather than hidden.
        kept_hashes.append(h)
        originals.append(_File(label, data, ext, "original", h))

    files: list[_File] = list(originals)
    planted: list[tuple[_File, _File, str, bool]] = []
    n_dirt = config.exact_duplicates + config.near_duplicates + config.cross_label
    if n_dirt + config.no_extension > len(originals):
        raise FixturesError(
            f"{n_dirt + config.no_extension} planted copies need as many originals; "
            f"there are {len(originals)} (raise per_class)"
        )
    picks = [originals[i] for i in rng.permutation(len(originals))]
    sources, no_ext = picks[:n_dirt], picks[n_dirt : n_dirt + config.no_extension]

    for src in sources[: config.exact_duplicates]:
        copy = _File(src.label, src.data, src.ext, "copy", src.phash)
        planted.append((src, copy, "exact", False))
    for i, src in enumerate(sources[config.exact_duplicates : len(sources) - config.cross_label]):
        kind = config.near_kinds[i % len(config.near_kinds)]
        data, ext = _near_copy(images.decode(src.data), kind, src.ext)
        planted.append((src, _File(src.label, data, ext, "copy", _phash(data)), kind, False))
    for i, src in enumerate(sources[len(sources) - config.cross_label :]):
        others = [lab for lab in labels if lab != src.label]
        label = others[int(rng.integers(len(others)))]
        kind = _CROSS_KINDS[i % len(_CROSS_KINDS)]
        if kind == "exact":
            copy = _File(label, src.data, src.ext, "copy", src.phash)
        else:
            data, ext = _near_copy(images.decode(src.data), kind, src.ext)
            copy = _File(label, data, ext, "copy", _phash(data))
        planted.append((src, copy, kind, True))
    files += [copy for _, copy, _, _ in planted]

    for f in no_ext:  # re-saved as JPEG: a real photo that lost its extension
        if f.ext != "jpg":
            f.data = _save_like(images.decode(f.data), "jpg")
            f.phash = _phash(f.data)
        f.ext = ""

    corrupt: list[tuple[_File, str]] = []
    for i in range(config.corrupt):
        kind = CORRUPT_KINDS[i % len(CORRUPT_KINDS)]
        label = labels[i % len(labels)]
        if kind == "empty":
            data = b""
        elif kind == "truncated":
            whole = _save_like(render_digit(pixels[spare[i % len(spare)]], rng, config.size), "jpg")
            data = whole[: len(whole) * 3 // 5]
        else:
            data = b"label,comment\nthis is not an image,it was exported as .jpg by mistake\n"
        corrupt.append((_File(label, data, "jpg", "corrupt"), kind))
    files += [f for f, _ in corrupt]

    # Names carry no hint of their role: one shuffled counter across all files.
    for f, n in zip(files, rng.permutation(len(files)), strict=True):
        f.name = f"img_{int(n):05d}" + (f".{f.ext}" if f.ext else "")

    for f in files:
        path = root / f.label / f.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.data)

    truth = GroundTruth(root=str(root), config=_config_dict(config))
    truth.labels = {f.relpath(): f.label for f in files}
    truth.originals = sorted(f.relpath() for f in originals)
    truth.no_extension = sorted(f.relpath() for f in no_ext)
    truth.corrupt = {f.relpath(): reason for f, reason in corrupt}
    truth.planted = [
        Planted(src.relpath(), copy.relpath(), kind, cross, _distance(src.phash, copy.phash))
        for src, copy, kind, cross in planted
    ]
    truth.accidental_near_pairs = _accidental_pairs(
        [f for f in files if f.phash is not None], truth
    )
    return truth


def _accidental_pairs(files: list[_File], truth: GroundTruth) -> list[tuple[str, str, int]]:
    """Pairs of files within PHASH_RADIUS that are not copies of the same original."""
    out = []
    for i, a in enumerate(files):
        for b in files[i + 1 :]:
            d = _distance(a.phash, b.phash)
            if d <= PHASH_RADIUS and truth.source_of(a.relpath()) != truth.source_of(b.relpath()):
                out.append((*sorted((a.relpath(), b.relpath())), d))
    return sorted(out)


def _config_dict(config: FixturesConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _no_bar(progress: bool | None) -> bool | None:
    # tqdm: disable=None hides the bar when stderr is not a terminal.
    return None if progress is None else not progress


def iter_files(root: str | Path) -> Iterable[str]:
    """Relative ``label/name`` paths of every file under ``root`` (for checking a folder)."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
