"""Training data: manifest rows -> decoded, transformed tensors, with deterministic sampling.

Three ideas keep training reproducible and robust:

* **Bad images never crash an epoch.** :class:`ManifestDataset` returns a
  :class:`Skipped` record instead of a sample when an image cannot be read or
  decoded; :func:`collate` drops those and counts them in the batch, so the loop
  can report how many images each epoch skipped (summed across ranks).
* **Sampling is a pure function of (seed, epoch).** :class:`EpochSampler` draws
  the epoch's global order (plain shuffle, class oversampling or class-weighted
  draws) from a generator seeded with both, then deals it out to the ranks like
  ``DistributedSampler``. A resumed run therefore sees the same batches, and the
  union of the ranks' batches at step k equals the 1-process batch of the same
  global size.
* **Augmentation randomness is per sample.** The sampler hands every position a
  seed; the dataset seeds ``torch``, ``random`` and ``numpy`` with it before the
  transform runs. Results do not depend on the number of workers, on persistent
  workers, or on where a resumed run restarts.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kaedama import images, storage
from kaedama.errors import KaedamaError
from kaedama.manifest import Row, parse_manifest
from kaedama.preprocess import Preprocess
from kaedama.train import augment
from kaedama.train.config import TrainConfig
from kaedama.train.model import input_size
from kaedama.train.runtime import Runtime, ignore_sigint

log = logging.getLogger(__name__)

BALANCE_MODES = ("none", "oversample", "weighted")
# Derived seeds stay below 2**62 so they fit every RNG we feed (numpy takes 32 bits of them).
_SEED_LIMIT = 2**62


class DataError(KaedamaError):
    """The manifest cannot be used for training (e.g. no kept training rows)."""


@dataclass(frozen=True)
class Example:
    """One image to load: where it is and its class index."""

    uri: str
    target: int


@dataclass(frozen=True)
class Skipped:
    """Returned by the dataset in place of a sample whose image could not be used."""

    uri: str
    reason: str


class Batch(NamedTuple):
    """A collated batch; ``images`` is ``None`` when every image in it was skipped."""

    images: torch.Tensor | None
    targets: torch.Tensor | None
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True)
class Splits:
    """The examples of each split and the class names (index = position)."""

    classes: tuple[str, ...]
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    test: tuple[Example, ...]
    unknown_labels: dict[str, int]  # val/test rows whose label never occurs in train
    manifest_uri: str = ""
    manifest_sha256: str = ""  # of the manifest file's bytes: which rows exactly
    header: dict[str, Any] | None = None  # the manifest header (hash recipe, writer stage)


def derive_seed(*parts: int) -> int:
    """A stable seed from integers (seed, epoch, step, rank, ...), independent of hashing salt."""
    seq = np.random.SeedSequence([int(p) % 2**32 for p in parts])
    return int(seq.generate_state(1, dtype=np.uint64)[0]) % _SEED_LIMIT


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed torch's CPU generator, Python ``random``, ``numpy`` and ``device``'s generator.

    ``torch.manual_seed`` would also queue a seeding of every CUDA device, which
    costs milliseconds per call before CUDA starts; data workers call this once
    per sample, so only the generators actually drawn from are seeded.
    """
    torch.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def class_names(rows: Sequence[Row]) -> tuple[str, ...]:
    """Sorted label names of the kept training rows (Unicode labels sort by code point)."""
    return tuple(sorted({r.label for r in rows if r.status == "kept" and r.split == "train"}))


def load_splits(manifest_uri: str) -> Splits:
    """Read a split manifest and turn its kept rows into examples per split.

    Raises:
        DataError: when the manifest has no kept training rows.
    """
    data = storage.read_bytes(manifest_uri)  # read once: hashed for lineage, then parsed
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{manifest_uri} is not UTF-8 text ({exc}); is it a manifest?") from exc
    manifest = parse_manifest(text, uri=manifest_uri)
    rows = manifest.rows
    classes = class_names(rows)
    if not classes:
        splits = Counter(r.split or "(none)" for r in rows if r.status == "kept")
        raise DataError(
            f"{manifest_uri}: no kept rows with split 'train' (kept rows per split: "
            f"{dict(splits) or 'none'}); run 'kaedama split' on the manifest first"
        )
    index = {name: i for i, name in enumerate(classes)}
    out: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    unknown: Counter[str] = Counter()
    for row in rows:
        if row.status != "kept" or row.split not in out:
            continue
        if row.label not in index:
            unknown[row.label] += 1
            continue
        out[row.split].append(Example(row.uri, index[row.label]))
    if unknown:
        log.warning(
            "%d val/test images have labels absent from train and are left out: %s",
            sum(unknown.values()),
            dict(unknown),
        )
    return Splits(
        classes=classes,
        train=tuple(out["train"]),
        val=tuple(out["val"]),
        test=tuple(out["test"]),
        unknown_labels=dict(unknown),
        manifest_uri=manifest_uri,
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        header=dict(manifest.header),
    )


class ManifestDataset(Dataset):
    """Images read through :mod:`kaedama.storage` and decoded by :mod:`kaedama.images`.

    Items are requested as ``(index, seed)`` pairs (see :class:`EpochSampler`);
    a plain ``index`` works too and uses no reseeding.

    Args:
        examples: what to load.
        transform: PIL image -> tensor (the training augmentation).
        max_pixels: refuse images larger than this (decompression bombs).
        draft: reduced-size JPEG decoding, ``(w, h)`` the decoded image must still cover.
        max_bytes: skip larger files unread (reason ``too_large``).
        preprocess: evaluation: bytes -> model input through exactly this
            :class:`~kaedama.preprocess.Preprocess` (decode options included), what
            ``kaedama evaluate`` and serving run; ``transform``, ``max_pixels`` and
            ``draft`` are then unused.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        transform: Callable[[Any], torch.Tensor] | None = None,
        *,
        max_pixels: int = images.DEFAULT_MAX_PIXELS,
        draft: tuple[int, int] | None = None,
        preprocess: Preprocess | None = None,
        max_bytes: int = images.DEFAULT_MAX_BYTES,
    ):
        if (transform is None) == (preprocess is None):
            raise ValueError("ManifestDataset needs a transform (training) or a preprocess")
        self.examples = list(examples)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft = draft
        self.preprocess = preprocess
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int] | Skipped:
        index, seed = item if isinstance(item, tuple) else (item, None)
        example = self.examples[index]
        try:
            # Never more than max_bytes in a worker's memory (a stray video in a label).
            data = storage.read_bytes(example.uri, max_bytes=self.max_bytes)
            if self.preprocess is not None:
                return torch.from_numpy(self.preprocess(data, uri=example.uri)), example.target
            image = images.decode(
                data, max_pixels=self.max_pixels, draft=self.draft, uri=example.uri
            )
        except images.ImageError as exc:
            return Skipped(example.uri, exc.reason)
        except storage.TooLargeError:
            return Skipped(example.uri, "too_large")
        except storage.StorageError as exc:
            return Skipped(example.uri, f"unreadable: {exc}")
        if seed is not None:
            seed_everything(seed)
        return self.transform(image), example.target


def collate(items: Sequence[tuple[torch.Tensor, int] | Skipped]) -> Batch:
    """Stack the good samples and keep the skipped ones' records (never raises for bad images)."""
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = tuple(it for it in items if isinstance(it, Skipped))
    if not good:
        return Batch(None, None, skipped)
    return Batch(
        torch.stack([img for img, _ in good]),
        torch.tensor([t for _, t in good], dtype=torch.long),
        skipped,
    )


class EpochSampler(Sampler):
    """Deterministic per-epoch order, optionally class-balanced, sharded over ranks.

    Yields ``(dataset_index, sample_seed)``. The global order of an epoch depends
    only on ``(seed, epoch)``; rank ``r`` of ``world`` takes positions
    ``r, r + world, ...`` after padding the order to a multiple of ``world``
    (training) or without padding (evaluation, so every image counts once).

    Args:
        targets: class index of every dataset item.
        seed: the run's seed.
        shuffle: shuffle each epoch (training) or keep manifest order (evaluation).
        balance: ``none``; ``oversample`` (every class drawn up to the largest
            class's count each epoch, extra copies drawn at random);
            ``weighted`` (``len(targets)`` draws with replacement, each class
            equally likely).
        rank, world: this process's place among the data-parallel ranks.
        pad: pad to equal shard sizes (required for DDP training).
        batch_size: the per-rank batch size for training; the epoch's order is then cut
            to whole global batches (``batch_size * world`` items) when it holds at least
            one, so every run with the same global batch sees the same batches whatever
            the number of ranks.
    """

    def __init__(
        self,
        targets: Sequence[int],
        *,
        seed: int = 0,
        shuffle: bool = True,
        balance: str = "none",
        rank: int = 0,
        world: int = 1,
        pad: bool = True,
        batch_size: int = 0,
    ):
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.seed = seed
        self.shuffle = shuffle
        self.balance = balance
        self.rank = rank
        self.world = world
        self.pad = pad
        self.batch_size = batch_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; ``start`` skips this rank's first ``start`` items (mid-epoch resume)."""
        self.epoch = epoch
        self.start = start

    def global_order(self) -> torch.Tensor:
        """This epoch's dataset indices for all ranks together, before sharding."""
        n = len(self.targets)
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A4D))
        if n == 0:
            return torch.empty(0, dtype=torch.long)
        if self.balance == "weighted":
            counts = torch.bincount(self.targets).double()
            weights = 1.0 / counts[self.targets]
            return torch.multinomial(weights, n, replacement=True, generator=g)
        if self.balance == "oversample":
            counts = torch.bincount(self.targets)
            top = int(counts.max())
            parts = []
            for cls in range(len(counts)):
                members = torch.nonzero(self.targets == cls).flatten()
                if len(members) == 0:
                    continue
                extra = members[torch.randint(len(members), (top - len(members),), generator=g)]
                parts.extend([members, extra])
            order = torch.cat(parts)
            return order[torch.randperm(len(order), generator=g)]
        if self.shuffle:
            return torch.randperm(n, generator=g)
        return torch.arange(n)

    def _whole_batches(self, n: int) -> int:
        step = self.batch_size * self.world
        return n - n % step if step and n >= step else n

    def _shard(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self.global_order()
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5EED))
        seeds = torch.randint(_SEED_LIMIT, (len(order),), generator=g)
        keep = self._whole_batches(len(order))
        order, seeds = order[:keep], seeds[:keep]
        if self.pad and self.world > 1 and len(order) % self.world:
            extra = self.world - len(order) % self.world
            # Repeat from the start of the order like DistributedSampler (wrapping when tiny).
            take = torch.arange(extra) % max(len(order), 1)
            order = torch.cat([order, order[take]])
            seeds = torch.cat([seeds, seeds[take]])
        return order[self.rank :: self.world], seeds[self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._shard()
        for i in range(self.start, len(order)):
            yield int(order[i]), int(seeds[i])

    def __len__(self) -> int:
        n = len(self.targets)
        if self.balance == "oversample" and n:
            counts = torch.bincount(self.targets)
            n = int(counts.max()) * int((counts > 0).sum())
        n = self._whole_batches(n)
        if self.pad and self.world > 1:
            per_rank = -(-n // self.world)
        else:
            per_rank = len(range(self.rank, n, self.world))
        return max(per_rank - self.start, 0)


# --------------------------------------------------------------------------- loaders


def _loader(
    dataset: ManifestDataset,
    sampler: EpochSampler,
    cfg: TrainConfig,
    rt: Runtime,
    *,
    drop_last: bool,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        collate_fn=collate,
        pin_memory=rt.device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=cfg.workers > 0,
        worker_init_fn=ignore_sigint if cfg.workers > 0 else None,
    )


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader | None
    test: DataLoader | None
    steps_per_epoch: int


def build_loaders(splits, data_config: dict, cfg: TrainConfig, rt: Runtime) -> Loaders:
    """Train loader (shuffled, balanced, sharded) and val/test loaders (sharded, in order).

    Val/test images go through the :class:`~kaedama.preprocess.Preprocess` built from
    ``data_config`` (the one saved in the checkpoints), so validation figures equal what
    ``kaedama evaluate`` and serving compute from the saved model.
    """
    h, w = input_size(data_config)
    # JPEGs decode at reduced size when much larger than needed: training keeps twice
    # the input size (random crops still see native detail).
    train_draft = (2 * w, 2 * h)
    sampler = EpochSampler(
        [e.target for e in splits.train],
        seed=cfg.seed,
        balance=cfg.balance,
        rank=rt.rank,
        world=rt.world,
        batch_size=cfg.batch_size,
    )
    # Full batches only (BatchNorm and DDP want equal, non-tiny batches) unless the
    # shard is smaller than one batch.
    drop_last = len(sampler) >= cfg.batch_size
    dataset = ManifestDataset(
        splits.train,
        augment.build_train_transform(data_config, cfg),
        max_pixels=cfg.max_pixels,
        draft=train_draft,
    )
    train = _loader(dataset, sampler, cfg, rt, drop_last=drop_last)
    steps = len(train)
    if cfg.max_steps_per_epoch > 0:
        steps = min(steps, cfg.max_steps_per_epoch)
    preprocess = Preprocess.from_data_config(data_config)

    def eval_loader(examples: tuple[Example, ...]) -> DataLoader | None:
        if not examples:
            return None
        order = EpochSampler(
            [e.target for e in examples],
            shuffle=False,
            rank=rt.rank,
            world=rt.world,
            pad=False,
        )
        dataset = ManifestDataset(examples, preprocess=preprocess)
        return _loader(dataset, order, cfg, rt, drop_last=False)

    return Loaders(train, eval_loader(splits.val), eval_loader(splits.test), steps)
