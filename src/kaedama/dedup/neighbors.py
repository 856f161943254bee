"""Exact near-neighbour search over binary hashes: every pair within Hamming distance t.

Nothing here is approximate. Each search is a candidate generator whose
completeness follows from the pigeonhole principle, followed by an exact
popcount check of every candidate.

Distributed form (Beam): :func:`block_keys` splits a hash into ``t + 1`` blocks.
Two hashes within distance ``t`` differ in at most ``t`` blocks, so they agree on at
least one whole block and meet in that block's bucket; :func:`pairs_in_bucket`
verifies one bucket. A pair that shares several blocks is found in several buckets,
so the caller de-duplicates the verified pairs.

In-memory form: :func:`find_pairs` generalises the split. With ``m`` blocks and at
most ``t`` differing, at least ``k = m - t`` blocks agree, so every pair within ``t``
shares the masked value ``h & mask`` for some ``k``-subset of the blocks. Larger keys
(``k > 1``) make buckets far smaller at the price of ``C(m, k)`` sorts; the plan is
picked by a cost model. Identical hashes are collapsed first, so a million blank
images (all hash 0) cost one bucket entry, not a million.

Scaling: each key is one ``argsort`` (O(N log N)) and candidate checks are
O(sum over buckets of size^2); candidates are generated and checked in bounded
chunks so memory stays O(N + chunk + output). The output itself is quadratic in the
size of a group of identical or mutually close hashes (that is what "every pair"
means); such groups are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from itertools import combinations
from math import comb

import numpy as np

log = logging.getLogger(__name__)

# Candidate pairs generated and popcount-checked per step; bounds temporary memory.
CHUNK_PAIRS = 1 << 22
# Buckets larger than this are logged (they are still verified exactly, in chunks).
LARGE_BUCKET = 5000

_PAIR_DTYPE = np.int64


def _block_bounds(bits: int, blocks: int) -> list[tuple[int, int]]:
    """(shift, width) of ``blocks`` near-equal blocks covering ``bits`` bits, most significant first."""
    if blocks < 1 or blocks > bits:
        raise ValueError(f"cannot split {bits} bits into {blocks} blocks")
    base, extra = divmod(bits, blocks)
    widths = [base + 1 if i < extra else base for i in range(blocks)]
    bounds = []
    top = bits
    for width in widths:
        top -= width
        bounds.append((top, width))
    return bounds


def block_keys(h: int, threshold: int, bits: int = 64) -> list[tuple[int, int]]:
    """The ``threshold + 1`` (block index, block value) keys of hash ``h``.

    Two hashes within Hamming distance ``threshold`` share at least one key.

    Args:
        h: the hash as a non-negative int of at most ``bits`` bits.
        threshold: the Hamming radius t (0 <= t < bits).
        bits: hash length.
    """
    if threshold < 0 or threshold >= bits:
        raise ValueError(f"threshold must be in [0, {bits - 1}], got {threshold}")
    return [
        (index, (h >> shift) & ((1 << width) - 1))
        for index, (shift, width) in enumerate(_block_bounds(bits, threshold + 1))
    ]


def hash_array(hashes: Sequence[int], bits: int = 64) -> np.ndarray:
    """Python-int hashes -> the array :func:`find_pairs` takes.

    Returns a 1-D ``uint64`` array for ``bits <= 64``, else ``(n, words)`` ``uint64``.
    """
    if bits <= 64:
        return np.array([int(h) for h in hashes], dtype=np.uint64)
    return _words(hashes, bits)


def _words(hashes: Sequence[int], bits: int | None = None) -> np.ndarray:
    """Python-int hashes -> (n, words) uint64 array, most significant word first."""
    if bits is None:
        bits = max((int(h).bit_length() for h in hashes), default=1)
    words = max(1, (bits + 63) // 64)
    out = np.empty((len(hashes), words), dtype=np.uint64)
    mask = (1 << 64) - 1
    for w in range(words):
        shift = 64 * (words - 1 - w)
        out[:, w] = [(int(h) >> shift) & mask for h in hashes]
    return out


def _popcount_xor(a: np.ndarray, b: np.ndarray, multiword: bool) -> np.ndarray:
    """Hamming distance between broadcast hashes; ``multiword``: the last axis holds words."""
    x = np.bitwise_count(np.bitwise_xor(a, b))
    return x.sum(axis=-1, dtype=np.int64) if multiword else x.astype(np.int64)


def _pairs_within_runs(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All position pairs (p, q), p < q, inside each run [start, start + length)."""
    if starts.size == 0:
        empty = np.zeros(0, dtype=_PAIR_DTYPE)
        return empty, empty
    # Element at local index a of a run of length L pairs with the L - 1 - a after it.
    run_of = np.repeat(np.arange(starts.size), lengths)
    local = np.arange(run_of.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    partners = lengths[run_of] - 1 - local
    src = np.repeat(starts[run_of] + local, partners)
    first = np.repeat(np.cumsum(partners) - partners, partners)
    dst = src + 1 + (np.arange(src.size) - first)
    return src.astype(_PAIR_DTYPE), dst.astype(_PAIR_DTYPE)


def _chunked_runs(lengths: np.ndarray, limit: int = CHUNK_PAIRS) -> Iterator[slice]:
    """Slices of consecutive runs whose pair counts sum to about ``limit`` each."""
    pairs = lengths * (lengths - 1) // 2
    cum = np.cumsum(pairs)
    begin = 0
    while begin < lengths.size:
        base = cum[begin - 1] if begin else 0
        end = int(np.searchsorted(cum, base + limit, side="right"))
        end = max(end, begin + 1)
        yield slice(begin, end)
        begin = end


def _huge_run_pairs(
    start: int, length: int, values: np.ndarray, threshold: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Verified pairs inside one very large run, one row block at a time (bounded memory)."""
    rows = max(1, CHUNK_PAIRS // max(length, 1))
    block = values[start : start + length]
    for r0 in range(0, length, rows):
        r1 = min(length, r0 + rows)
        dist = _popcount_xor(block[r0:r1, None], block[None, :], block.ndim == 2)
        ii, jj = np.nonzero(dist <= threshold)
        keep = jj > ii + r0
        ii, jj = ii[keep] + r0, jj[keep]
        yield ii + start, jj + start, dist[ii - r0, jj]


def _verified_in_runs(
    order: np.ndarray,
    keys_sorted: np.ndarray,
    values: np.ndarray,
    threshold: int,
    max_bucket: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For keys sorted ascending, yield verified (i, j, dist) over original indices."""
    n = keys_sorted.shape[0]
    if n < 2:
        return
    change = np.flatnonzero(keys_sorted[1:] != keys_sorted[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [n])))
    multi = lengths > 1
    starts, lengths = starts[multi], lengths[multi]
    big = lengths > max_bucket
    for start, length in zip(starts[big].tolist(), lengths[big].tolist(), strict=True):
        log.warning(
            "bucket of %d hashes (> max_bucket %d): verifying it exactly in chunks",
            length,
            max_bucket,
        )
        ordered = values[order[start : start + length]]
        for p, q, d in _huge_run_pairs(0, length, ordered, threshold):
            yield order[start + p], order[start + q], d
    starts, lengths = starts[~big], lengths[~big]
    for part in _chunked_runs(lengths):
        p, q = _pairs_within_runs(starts[part], lengths[part])
        i, j = order[p], order[q]
        dist = _popcount_xor(values[i], values[j], values.ndim == 2)
        ok = dist <= threshold
        yield i[ok], j[ok], dist[ok]


def _plan(n: int, bits: int, threshold: int) -> tuple[int, int]:
    """Pick (blocks m, key size k = m - t) minimising sort + expected-candidate cost."""
    best: tuple[float, int, int] | None = None
    for m in range(threshold + 1, min(bits, threshold + 5) + 1):
        k = m - threshold
        keys = comb(m, k)
        if keys > 200:
            continue
        key_bits = bits * k / m
        # A sort costs ~log2(n) steps per element; a candidate check ~2 steps.
        cost = keys * (n * max(np.log2(max(n, 2)), 1.0) + 2.0 * n * n / 2.0 ** (key_bits + 1))
        if best is None or cost < best[0]:
            best = (cost, m, k)
    if best is None:
        return threshold + 1, 1
    return best[1], best[2]


def _normalise(hashes: np.ndarray) -> np.ndarray:
    arr = np.asarray(hashes)
    if arr.dtype != np.uint64:
        if arr.dtype.kind not in "iu":
            raise TypeError(f"hashes must be an unsigned integer array, got {arr.dtype}")
        arr = arr.astype(np.uint64)
    if arr.ndim not in (1, 2):
        raise ValueError("hashes must be 1-D (64-bit) or 2-D (n, words) uint64")
    return arr


def _finish(i: np.ndarray, j: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Rows (i, j, dist) with i < j, unique, sorted."""
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    out = np.stack([lo, hi, d]).T.astype(np.int64) if lo.size else np.zeros((0, 3), np.int64)
    if out.shape[0]:
        out = np.unique(out, axis=0)
    return out


def _expand_groups(
    inverse: np.ndarray, pairs_u: np.ndarray, n_unique: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs between unique values -> pairs between original indices (+ identical pairs)."""
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=n_unique)
    first = np.cumsum(counts) - counts
    outs_i, outs_j, outs_d = [], [], []
    # Identical hashes: every pair inside a group, distance 0.
    multi = np.flatnonzero(counts > 1)
    for part in _chunked_runs(counts[multi]):
        p, q = _pairs_within_runs(first[multi][part], counts[multi][part])
        outs_i.append(order[p])
        outs_j.append(order[q])
        outs_d.append(np.zeros(p.size, dtype=np.int64))
    # Distinct but close hashes: the cross product of their groups.
    if pairs_u.shape[0]:
        u, v, d = pairs_u[:, 0], pairs_u[:, 1], pairs_u[:, 2]
        sizes = counts[u] * counts[v]
        pair_of = np.repeat(np.arange(u.size), sizes)
        local = np.arange(pair_of.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        cv = counts[v][pair_of]
        outs_i.append(order[first[u][pair_of] + local // cv])
        outs_j.append(order[first[v][pair_of] + local % cv])
        outs_d.append(d[pair_of])
    if not outs_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(outs_i), np.concatenate(outs_j), np.concatenate(outs_d)


def find_pairs(
    hashes: np.ndarray,
    threshold: int,
    *,
    max_bucket: int = LARGE_BUCKET,
    blocks: int | None = None,
) -> np.ndarray:
    """Every pair of hashes within Hamming distance ``threshold``, found exactly.

    Args:
        hashes: 1-D ``uint64`` array of 64-bit hashes, or ``(n, words)`` ``uint64`` for
            longer hashes (most significant word first). For multi-word hashes the
            search runs on the first word (a pair within t overall is within t there)
            and verifies on all words.
        threshold: the Hamming radius t >= 0.
        max_bucket: buckets larger than this are logged and verified row block by
            row block.
        blocks: force the number of blocks m (default: chosen by a cost model).

    Returns:
        ``int64`` array of rows ``(i, j, dist)``, ``i < j``, sorted by (i, j).
    """
    arr = _normalise(hashes)
    n = arr.shape[0]
    if threshold < 0 or n < 2:
        return np.zeros((0, 3), dtype=np.int64)
    uniq, inverse = np.unique(arr, axis=0 if arr.ndim == 2 else None, return_inverse=True)
    inverse = inverse.reshape(-1)
    first_word = uniq if uniq.ndim == 1 else uniq[:, 0]
    bits = 64
    found_i, found_j, found_d = [], [], []
    if threshold >= bits:
        m, k = 1, 1
        key_masks = [np.uint64(0)]
    else:
        if blocks is None:
            m, k = _plan(first_word.shape[0], bits, threshold)
        else:
            m, k = blocks, max(1, blocks - threshold)
            if m <= threshold:
                raise ValueError(f"blocks must be > threshold ({threshold}), got {blocks}")
        block_masks = [((1 << w) - 1) << s for s, w in _block_bounds(bits, m)]
        key_masks = [np.uint64(sum(block_masks[b] for b in c)) for c in combinations(range(m), k)]
    for c, mask in enumerate(key_masks):
        keys = first_word & mask
        order = np.argsort(keys, kind="stable")
        for i, j, d in _verified_in_runs(order, keys[order], uniq, threshold, max_bucket):
            if c:
                # Report a pair from the first key it shares only: no duplicates to sort out.
                xor = first_word[i] ^ first_word[j]
                first_key = np.ones(i.size, dtype=bool)
                for earlier in key_masks[:c]:
                    first_key &= (xor & earlier) != 0
                i, j, d = i[first_key], j[first_key], d[first_key]
            found_i.append(i)
            found_j.append(j)
            found_d.append(d)
    if found_i:
        ui, uj, ud = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)
        pairs_u = np.stack([np.minimum(ui, uj), np.maximum(ui, uj), ud]).T.astype(np.int64)
    else:
        pairs_u = np.zeros((0, 3), dtype=np.int64)
    i, j, d = _expand_groups(inverse, pairs_u, uniq.shape[0])
    return _finish(i, j, d)


def brute_force_pairs(hashes: np.ndarray, threshold: int, *, rows: int = 1024) -> np.ndarray:
    """Reference: all-pairs popcount in row blocks. Same output format as :func:`find_pairs`."""
    arr = _normalise(hashes)
    n = arr.shape[0]
    out_i, out_j, out_d = [], [], []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        dist = _popcount_xor(arr[r0:r1, None], arr[None, :], arr.ndim == 2)
        ii, jj = np.nonzero(dist <= threshold)
        keep = jj > ii + r0
        ii, jj = ii[keep], jj[keep]
        out_i.append(ii + r0)
        out_j.append(jj)
        out_d.append(dist[ii, jj])
    if not out_i:
        return np.zeros((0, 3), dtype=np.int64)
    return _finish(np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d))


def pairs_in_bucket(
    items: Sequence[tuple[str, int]], threshold: int, *, max_bucket: int = LARGE_BUCKET
) -> list[tuple[str, str, int]]:
    """Verified pairs inside one bucket of ``(uri, hash)`` items.

    Args:
        items: the bucket's members; hashes are Python ints of any length.
        threshold: the Hamming radius t.
        max_bucket: larger buckets are logged and checked row block by row block.

    Returns:
        ``(a, b, dist)`` with ``a < b`` and ``dist <= threshold``, sorted; pairs of the
        same URI are never reported.
    """
    ordered = sorted({(uri, int(h)) for uri, h in items})
    if len(ordered) < 2:
        return []
    if len(ordered) > max_bucket:
        log.warning(
            "bucket of %d hashes (> max_bucket %d): verifying it in chunks",
            len(ordered),
            max_bucket,
        )
    uris = [u for u, _ in ordered]
    words = _words([h for _, h in ordered])
    rows = max(1, CHUNK_PAIRS // len(ordered))
    out: list[tuple[str, str, int]] = []
    for r0 in range(0, len(ordered), rows):
        dist = _popcount_xor(words[r0 : r0 + rows, None], words[None, :], True)
        ii, jj = np.nonzero(dist <= threshold)
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            a, b = uris[i + r0], uris[j]
            if j > i + r0 and a != b:
                out.append((a, b, int(dist[i, j])))
    out.sort()
    return out
